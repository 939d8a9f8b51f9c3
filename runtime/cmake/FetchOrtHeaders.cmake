# Locate the onnxruntime C/C++ API headers (onnxruntime_c_api.h,
# onnxruntime_cxx_api.h, ...). Only headers are needed: the library links no
# onnxruntime. Order:
#   1. ORT_INCLUDE_DIR (CMake cache variable or environment variable),
#   2. system places (/usr/include/onnxruntime, /usr/local/include/onnxruntime, ...),
#   3. a cache dir filled earlier by step 4 (OCOMP_CACHE_DIR or ~/.cache/ocomp,
#      subdir ort-headers),
#   4. Debian trixie's libonnxruntime-dev fetched with `apt-get download`
#      through a private sources list, state and cache (the system's apt
#      configuration is never modified), unpacked with `dpkg-deb -x`.
# Fails with one FATAL_ERROR saying how to provide the headers.

set(ORT_INCLUDE_DIR "" CACHE PATH "Directory containing onnxruntime_cxx_api.h")

function(_ocomp_header_dir_ok dir out)
  if(dir AND EXISTS "${dir}/onnxruntime_cxx_api.h" AND EXISTS "${dir}/onnxruntime_c_api.h")
    set(${out} TRUE PARENT_SCOPE)
  else()
    set(${out} FALSE PARENT_SCOPE)
  endif()
endfunction()

# Debian mirror the system already uses (so a local/proxy mirror is reused);
# falls back to deb.debian.org.
function(_ocomp_debian_mirror out)
  set(mirror "")
  file(GLOB source_files "/etc/apt/sources.list.d/*.sources" "/etc/apt/sources.list.d/*.list")
  if(EXISTS "/etc/apt/sources.list")
    list(APPEND source_files "/etc/apt/sources.list")
  endif()
  foreach(f IN LISTS source_files)
    file(STRINGS "${f}" lines REGEX "(^URIs:|^deb )")
    foreach(line IN LISTS lines)
      string(REGEX MATCHALL "[a-z+]+://[^ \t\\]]+" uris "${line}")
      foreach(uri IN LISTS uris)
        string(REGEX REPLACE "/+$" "" uri "${uri}")
        # The main archive, not debian-security, debian-ports or a vendor repo.
        if(NOT mirror AND uri MATCHES "/debian$" AND NOT uri MATCHES "security")
          set(mirror "${uri}")
        endif()
      endforeach()
    endforeach()
  endforeach()
  if(NOT mirror)
    set(mirror "http://deb.debian.org/debian")
  endif()
  set(${out} "${mirror}" PARENT_SCOPE)
endfunction()

function(_ocomp_fetch_debian_headers cache_root out_dir out_log)
  set(log "")
  find_program(OCOMP_APT_GET apt-get)
  find_program(OCOMP_DPKG_DEB dpkg-deb)
  set(keyring "/usr/share/keyrings/debian-archive-keyring.gpg")
  if(NOT OCOMP_APT_GET OR NOT OCOMP_DPKG_DEB)
    set(${out_log} "apt-get/dpkg-deb not found" PARENT_SCOPE)
    return()
  endif()
  if(NOT EXISTS "${keyring}")
    set(${out_log} "${keyring} missing (install debian-archive-keyring)" PARENT_SCOPE)
    return()
  endif()

  _ocomp_debian_mirror(mirror)
  string(RANDOM LENGTH 8 tag)
  set(work "${cache_root}/apt-${tag}")
  file(REMOVE_RECURSE "${work}")
  file(MAKE_DIRECTORY "${work}/lists/partial" "${work}/cache/archives/partial" "${work}/deb")
  file(WRITE "${work}/trixie.sources"
    "Types: deb\nURIs: ${mirror}\nSuites: trixie\nComponents: main\nSigned-By: ${keyring}\n")

  execute_process(COMMAND id -u OUTPUT_VARIABLE uid OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(uid STREQUAL "0")
    set(sandbox_user root)
  else()
    execute_process(COMMAND id -un OUTPUT_VARIABLE sandbox_user OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  endif()
  set(apt_opts
    -q -y
    -o "Dir::Etc::SourceList=${work}/trixie.sources"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=${work}/lists"
    -o "Dir::Cache=${work}/cache"
    -o "Dir::State::status=/var/lib/dpkg/status"
    -o "APT::Sandbox::User=${sandbox_user}"
    -o "Acquire::Languages=none"
    -o "Debug::NoLocking=1")
  message(STATUS "ocomp: fetching libonnxruntime-dev (Debian trixie) from ${mirror}")
  execute_process(COMMAND "${OCOMP_APT_GET}" ${apt_opts} update
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 300)
  if(NOT rc EQUAL 0)
    file(REMOVE_RECURSE "${work}")
    set(${out_log} "apt-get update failed (${rc}): ${err}" PARENT_SCOPE)
    return()
  endif()
  execute_process(COMMAND "${OCOMP_APT_GET}" ${apt_opts} download libonnxruntime-dev
    WORKING_DIRECTORY "${work}/deb"
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 300)
  file(GLOB debs "${work}/deb/libonnxruntime-dev_*.deb")
  if(NOT rc EQUAL 0 OR NOT debs)
    file(REMOVE_RECURSE "${work}")
    set(${out_log} "apt-get download libonnxruntime-dev failed (${rc}): ${err}" PARENT_SCOPE)
    return()
  endif()
  list(GET debs 0 deb)
  execute_process(COMMAND "${OCOMP_DPKG_DEB}" -x "${deb}" "${work}/root"
    RESULT_VARIABLE rc ERROR_VARIABLE err)
  _ocomp_header_dir_ok("${work}/root/usr/include/onnxruntime" ok)
  if(NOT rc EQUAL 0 OR NOT ok)
    file(REMOVE_RECURSE "${work}")
    set(${out_log} "dpkg-deb -x ${deb} failed (${rc}): ${err}" PARENT_SCOPE)
    return()
  endif()
  # Publish atomically: concurrent builds may race here; the first rename wins.
  get_filename_component(deb_name "${deb}" NAME)
  file(WRITE "${work}/root/SOURCE" "${mirror} trixie ${deb_name}\n")
  if(NOT EXISTS "${cache_root}/ort-headers/usr/include/onnxruntime/onnxruntime_cxx_api.h")
    file(REMOVE_RECURSE "${cache_root}/ort-headers")
    file(RENAME "${work}/root" "${cache_root}/ort-headers")
  endif()
  file(REMOVE_RECURSE "${work}")
  set(${out_dir} "${cache_root}/ort-headers/usr/include/onnxruntime" PARENT_SCOPE)
  set(${out_log} "" PARENT_SCOPE)
endfunction()

# ocomp_find_ort_headers(<include dir var> <api version var>)
function(ocomp_find_ort_headers out_dir out_version)
  set(dir "")
  set(tried "")
  # 1. explicit
  set(explicit "${ORT_INCLUDE_DIR}")
  if(NOT explicit AND DEFINED ENV{ORT_INCLUDE_DIR})
    set(explicit "$ENV{ORT_INCLUDE_DIR}")
  endif()
  if(explicit)
    foreach(cand "${explicit}" "${explicit}/onnxruntime" "${explicit}/include/onnxruntime"
                 "${explicit}/include" "${explicit}/onnxruntime/core/session")
      _ocomp_header_dir_ok("${cand}" ok)
      if(ok AND NOT dir)
        set(dir "${cand}")
      endif()
    endforeach()
    if(NOT dir)
      message(FATAL_ERROR "ocomp: ORT_INCLUDE_DIR=${explicit} does not contain onnxruntime_cxx_api.h "
                          "and onnxruntime_c_api.h")
    endif()
  endif()

  # 2. system places
  if(NOT dir)
    foreach(cand /usr/include/onnxruntime /usr/local/include/onnxruntime
                 /usr/include/onnxruntime/core/session /usr/local/include/onnxruntime/core/session
                 /opt/onnxruntime/include /usr/include /usr/local/include)
      _ocomp_header_dir_ok("${cand}" ok)
      if(ok AND NOT dir)
        set(dir "${cand}")
      endif()
    endforeach()
  endif()

  # 3. cache, 4. fetch into the cache
  if(NOT dir)
    if(DEFINED ENV{OCOMP_CACHE_DIR} AND NOT "$ENV{OCOMP_CACHE_DIR}" STREQUAL "")
      set(cache_root "$ENV{OCOMP_CACHE_DIR}")
    elseif(DEFINED ENV{HOME} AND NOT "$ENV{HOME}" STREQUAL "")
      set(cache_root "$ENV{HOME}/.cache/ocomp")
    else()
      set(cache_root "${CMAKE_BINARY_DIR}/ocomp-cache")
    endif()
    set(cached "${cache_root}/ort-headers/usr/include/onnxruntime")
    _ocomp_header_dir_ok("${cached}" ok)
    if(ok)
      set(dir "${cached}")
    else()
      file(MAKE_DIRECTORY "${cache_root}")
      _ocomp_fetch_debian_headers("${cache_root}" fetched fetch_log)
      _ocomp_header_dir_ok("${cached}" ok)
      if(ok)
        set(dir "${cached}")
      else()
        set(tried "${fetch_log}")
      endif()
    endif()
  endif()

  if(NOT dir)
    message(FATAL_ERROR
      "ocomp: onnxruntime headers (onnxruntime_cxx_api.h) not found and could not be fetched"
      " (${tried}).\n"
      "Provide them in one of these ways:\n"
      "  * -DORT_INCLUDE_DIR=<dir> or the environment variable ORT_INCLUDE_DIR=<dir> (for pip),\n"
      "    e.g. the include/ dir of an onnxruntime release archive from GitHub;\n"
      "  * install them system-wide: apt-get install libonnxruntime-dev (Debian trixie+/Ubuntu 24.10+);\n"
      "  * or unpack libonnxruntime-dev_*.deb with `dpkg-deb -x <deb> <OCOMP_CACHE_DIR>/ort-headers`\n"
      "    (default cache ~/.cache/ocomp).")
  endif()

  file(STRINGS "${dir}/onnxruntime_c_api.h" version_line REGEX "^#define ORT_API_VERSION [0-9]+")
  string(REGEX MATCH "[0-9]+" version "${version_line}")
  if(NOT version)
    message(FATAL_ERROR "ocomp: could not read ORT_API_VERSION from ${dir}/onnxruntime_c_api.h")
  endif()
  set(${out_dir} "${dir}" PARENT_SCOPE)
  set(${out_version} "${version}" PARENT_SCOPE)
endfunction()
