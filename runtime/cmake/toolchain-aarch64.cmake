# Cross-compile the ocomp runtime for 64-bit Arm Linux boards (NEON baseline).
#
#   apt-get install g++-aarch64-linux-gnu          # Debian/Ubuntu cross compiler
#   cmake -S runtime -B build-arm64 \
#         -DCMAKE_TOOLCHAIN_FILE=runtime/cmake/toolchain-aarch64.cmake \
#         -DORT_INCLUDE_DIR=/path/to/onnxruntime/include
#   cmake --build build-arm64 -j
#
# The headers are architecture independent, so the x86 cache fetched by a
# normal build (~/.cache/ocomp/ort-headers/usr/include/onnxruntime) works too.
# Override the compiler prefix with -DCROSS_PREFIX=... (e.g. a vendor SDK).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

if(NOT DEFINED CROSS_PREFIX)
  set(CROSS_PREFIX aarch64-linux-gnu-)
endif()
set(CMAKE_C_COMPILER ${CROSS_PREFIX}gcc)
set(CMAKE_CXX_COMPILER ${CROSS_PREFIX}g++)

# Optional sysroot of the board image: -DCMAKE_SYSROOT=/path/to/sysroot
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
