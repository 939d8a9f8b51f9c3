# Locate the onnxruntime C/C++ API headers (onnxruntime_c_api.h,
# onnxruntime_cxx_api.h, ...). Only headers are needed: the library links no
# onnxruntime. Order:
#   1. ORT_INCLUDE_DIR (CMake cache variable or environment variable),
#   2. system places (/usr/include/onnxruntime, /usr/local/include/onnxruntime, ...),
#   3. a cache dir filled earlier by step 4 (OCOMP_CACHE_DIR or ~/.cache/ocomp,
#      subdir ort-headers),
#   4. Debian trixie's libonnxruntime-dev fetched with `apt-get download`
#      through a private sources list, state and cache (the system's apt
#      configuration is never modified), unpacked with `dpkg-deb -x`;
#      where that cannot work (no apt-get/dpkg-deb or Debian keyring, e.g.
#      Ubuntu or non-Debian CI), the same package at a pinned version is
#      downloaded from the mirror's pool, checked against its SHA-256 and
#      unpacked by CMake itself.
# Fails with one FATAL_ERROR saying how to provide the headers.

set(ORT_INCLUDE_DIR "" CACHE PATH "Directory containing onnxruntime_cxx_api.h")

function(_ocomp_header_dir_ok dir out)
  if(dir AND EXISTS "${dir}/onnxruntime_cxx_api.h" AND EXISTS "${dir}/onnxruntime_c_api.h")
    set(${out} TRUE PARENT_SCOPE)
  else()
    set(${out} FALSE PARENT_SCOPE)
  endif()
endfunction()

# Debian mirror: $OCOMP_DEBIAN_MIRROR, else the one the system already uses
# (so a local/proxy mirror is reused), else deb.debian.org.
function(_ocomp_debian_mirror out)
  if(DEFINED ENV{OCOMP_DEBIAN_MIRROR} AND NOT "$ENV{OCOMP_DEBIAN_MIRROR}" STREQUAL "")
    string(REGEX REPLACE "/+$" "" mirror "$ENV{OCOMP_DEBIAN_MIRROR}")
    set(${out} "${mirror}" PARENT_SCOPE)
    return()
  endif()
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
  if(DEFINED ENV{OCOMP_HEADERS_NO_APT} AND NOT "$ENV{OCOMP_HEADERS_NO_APT}" STREQUAL "")
    set(${out_log} "OCOMP_HEADERS_NO_APT is set" PARENT_SCOPE)
    return()
  endif()
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
  get_filename_component(deb_name "${deb}" NAME)
  _ocomp_publish_headers("${work}/root" "${cache_root}" "${mirror} trixie ${deb_name}")
  file(REMOVE_RECURSE "${work}")
  set(${out_dir} "${cache_root}/ort-headers/usr/include/onnxruntime" PARENT_SCOPE)
  set(${out_log} "" PARENT_SCOPE)
endfunction()

# Debian trixie libonnxruntime-dev pinned for the fallback download (headers
# are architecture independent, so the amd64 package serves every target).
set(_OCOMP_PINNED_DEB "libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb")
set(_OCOMP_PINNED_SHA256 "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")

function(_ocomp_publish_headers work_root cache_root source)
  file(WRITE "${work_root}/SOURCE" "${source}\n")
  # Concurrent builds may race here; the first one to publish wins.
  if(NOT EXISTS "${cache_root}/ort-headers/usr/include/onnxruntime/onnxruntime_cxx_api.h")
    file(REMOVE_RECURSE "${cache_root}/ort-headers")
    file(RENAME "${work_root}" "${cache_root}/ort-headers")
  endif()
endfunction()

function(_ocomp_download_pinned_headers cache_root out_log)
  _ocomp_debian_mirror(mirror)
  string(RANDOM LENGTH 8 tag)
  set(work "${cache_root}/dl-${tag}")
  file(REMOVE_RECURSE "${work}")
  set(url "${mirror}/pool/main/o/onnxruntime/${_OCOMP_PINNED_DEB}")
  message(STATUS "ocomp: downloading ${url}")
  # Hash checked by hand: EXPECTED_HASH would raise its own error on failure.
  file(DOWNLOAD "${url}" "${work}/${_OCOMP_PINNED_DEB}" TIMEOUT 300 STATUS status)
  list(GET status 0 code)
  if(NOT code EQUAL 0)
    file(REMOVE_RECURSE "${work}")
    set(${out_log} "download of ${url} failed: ${status}" PARENT_SCOPE)
    return()
  endif()
  file(SHA256 "${work}/${_OCOMP_PINNED_DEB}" sha256)
  if(NOT sha256 STREQUAL _OCOMP_PINNED_SHA256)
    file(REMOVE_RECURSE "${work}")
    set(${out_log} "${url} has SHA-256 ${sha256}, expected ${_OCOMP_PINNED_SHA256}" PARENT_SCOPE)
    return()
  endif()
  file(ARCHIVE_EXTRACT INPUT "${work}/${_OCOMP_PINNED_DEB}" DESTINATION "${work}/ar")
  file(GLOB data "${work}/ar/data.tar*")
  if(data)
    file(ARCHIVE_EXTRACT INPUT "${data}" DESTINATION "${work}/root")
  endif()
  _ocomp_header_dir_ok("${work}/root/usr/include/onnxruntime" ok)
  if(NOT ok)
    file(REMOVE_RECURSE "${work}")
    set(${out_log} "${_OCOMP_PINNED_DEB} did not contain the headers" PARENT_SCOPE)
    return()
  endif()
  _ocomp_publish_headers("${work}/root" "${cache_root}" "${url}")
  file(REMOVE_RECURSE "${work}")
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
      if(NOT ok)
        message(STATUS "ocomp: apt route failed (${fetch_log}); trying the pinned package")
        _ocomp_download_pinned_headers("${cache_root}" download_log)
        _ocomp_header_dir_ok("${cached}" ok)
      endif()
      if(ok)
        set(dir "${cached}")
      else()
        set(tried "${fetch_log}; ${download_log}")
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
