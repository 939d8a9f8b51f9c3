// Runs an ocomp-compressed ONNX model with the onnxruntime C++ API.
//
//   ocomp_deploy <model.onnx> <libocomp_runtime.so> <input.raw> <d0,d1,...> <output.raw> [threads]
//
// input.raw holds the model's first input as raw little-endian float32 of the
// given shape; the first output is written the same way and its shape printed.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "onnxruntime_cxx_api.h"

namespace {

std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) shape.push_back(std::stoll(item));
  return shape;
}

std::vector<float> read_floats(const std::string& path, size_t count) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<float> data(count);
  in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(count * sizeof(float)));
  if (static_cast<size_t>(in.gcount()) != count * sizeof(float))
    throw std::runtime_error(path + " holds fewer than " + std::to_string(count) + " floats");
  return data;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::cerr << "usage: " << argv[0] << " model.onnx libocomp_runtime.so input.raw d0,d1,... output.raw [threads]\n";
    return 2;
  }
  try {
    const std::string model = argv[1], library = argv[2], input_path = argv[3], output_path = argv[5];
    const std::vector<int64_t> shape = parse_shape(argv[4]);
    size_t count = 1;
    for (int64_t d : shape) count *= static_cast<size_t>(d);

    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "ocomp_deploy");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(argc > 6 ? std::stoi(argv[6]) : 1);
    options.RegisterCustomOpsLibrary(library.c_str());  // the "ocomp" domain
    Ort::Session session(env, model.c_str(), options);

    Ort::AllocatorWithDefaultOptions allocator;
    Ort::AllocatedStringPtr input_name = session.GetInputNameAllocated(0, allocator);
    Ort::AllocatedStringPtr output_name = session.GetOutputNameAllocated(0, allocator);

    std::vector<float> input = read_floats(input_path, count);
    Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    Ort::Value tensor = Ort::Value::CreateTensor<float>(memory, input.data(), input.size(), shape.data(), shape.size());

    const char* input_names[] = {input_name.get()};
    const char* output_names[] = {output_name.get()};
    std::vector<Ort::Value> outputs = session.Run(Ort::RunOptions{nullptr}, input_names, &tensor, 1, output_names, 1);

    auto info = outputs[0].GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> out_shape = info.GetShape();
    const size_t out_count = info.GetElementCount();
    const float* out = outputs[0].GetTensorData<float>();
    std::ofstream file(output_path, std::ios::binary);
    file.write(reinterpret_cast<const char*>(out), static_cast<std::streamsize>(out_count * sizeof(float)));
    if (!file) throw std::runtime_error("cannot write " + output_path);

    std::cout << "output shape";
    for (int64_t d : out_shape) std::cout << ' ' << d;
    std::cout << '\n';
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "ocomp_deploy: " << e.what() << '\n';
    return 1;
  }
}
