# CUDA kernels (csrc/cuda/*.cu) compiled into the same extension module, plus two optional parts
# with their own compile rules:
#   DISAGG_NVSHMEM (AUTO|ON|OFF): libdisagg_nvshmem.so, the NVSHMEM EP transport (relocatable
#     device code, device-linked with the nvidia-nvshmem-cu13 wheel's libnvshmem_device.a),
#     loaded from Python with ctypes; AUTO builds it when the wheel is importable.
#   DISAGG_CUTLASS (AUTO|ON|OFF): the CUTLASS grouped GEMM behind expert_gemm on CUDA (headers
#     from the nvidia-cutlass wheel), compiled without torch headers and linked into _C; AUTO
#     builds it when the wheel is importable. Without it expert_gemm on CUDA runs one cuBLAS
#     matmul per expert.
enable_language(CUDA)
if(DISAGG_CUDA_ARCHS STREQUAL "")
  set(DISAGG_CUDA_ARCHS "80;90a")
  if(CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.8)
    list(APPEND DISAGG_CUDA_ARCHS "100")
  endif()
endif()
file(GLOB DISAGG_CUDA_SOURCES CONFIGURE_DEPENDS csrc/cuda/*.cu csrc/cuda/*.cpp)
target_sources(_C PRIVATE ${DISAGG_CUDA_SOURCES})
set_target_properties(_C PROPERTIES CUDA_ARCHITECTURES "${DISAGG_CUDA_ARCHS}")
target_compile_definitions(_C PRIVATE DISAGG_WITH_CUDA=1)
target_link_libraries(_C PRIVATE CUDA::cudart)
target_compile_options(_C PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr -lineinfo>)
message(STATUS "disagg: CUDA architectures ${DISAGG_CUDA_ARCHS}")

# Root of a pip wheel's files (prints nothing when the module is absent).
function(disagg_wheel_dir out code)
  execute_process(COMMAND "${Python_EXECUTABLE}" -c "${code}" OUTPUT_VARIABLE _dir
                  RESULT_VARIABLE _rc OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(NOT _rc EQUAL 0)
    set(_dir "")
  endif()
  set(${out} "${_dir}" PARENT_SCOPE)
endfunction()

# ---- NVSHMEM EP transport ---------------------------------------------------------------------
set(DISAGG_NVSHMEM "AUTO" CACHE STRING "Build the NVSHMEM EP transport library: AUTO, ON or OFF")
set(DISAGG_WITH_NVSHMEM OFF)
if(NOT DISAGG_NVSHMEM STREQUAL "OFF")
  disagg_wheel_dir(_nvshmem_root "import nvidia.nvshmem as n; print(list(n.__path__)[0])")
  if(_nvshmem_root AND EXISTS "${_nvshmem_root}/lib/libnvshmem_device.a")
    set(DISAGG_WITH_NVSHMEM ON)
  elseif(DISAGG_NVSHMEM STREQUAL "ON")
    message(FATAL_ERROR "DISAGG_NVSHMEM=ON but the nvidia-nvshmem-cu13 wheel is not installed "
                        "for ${Python_EXECUTABLE} (pip install nvidia-nvshmem-cu13)")
  endif()
endif()
if(DISAGG_WITH_NVSHMEM)
  add_library(disagg_nvshmem_device STATIC IMPORTED)
  set_target_properties(disagg_nvshmem_device PROPERTIES
    IMPORTED_LOCATION "${_nvshmem_root}/lib/libnvshmem_device.a")
  add_library(disagg_nvshmem SHARED csrc/cuda/nvshmem/ep_transport.cu)
  target_include_directories(disagg_nvshmem PRIVATE "${_nvshmem_root}/include")
  target_link_libraries(disagg_nvshmem PRIVATE disagg_nvshmem_device
                        "${_nvshmem_root}/lib/libnvshmem_host.so.3" CUDA::cudart)
  set_target_properties(disagg_nvshmem PROPERTIES
    # C++17 like the wheel's own examples (C++20 deprecates volatile compound assignments that
    # NVSHMEM's device headers use); no torch headers here
    CUDA_STANDARD 17 CUDA_ARCHITECTURES "${DISAGG_CUDA_ARCHS}" CUDA_SEPARABLE_COMPILATION ON
    CUDA_RESOLVE_DEVICE_SYMBOLS ON POSITION_INDEPENDENT_CODE ON
    # the wheel's host library and bootstrap plugins, found without LD_LIBRARY_PATH
    INSTALL_RPATH "${_nvshmem_root}/lib" BUILD_RPATH "${_nvshmem_root}/lib")
  target_compile_options(disagg_nvshmem PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo>)
  install(TARGETS disagg_nvshmem LIBRARY DESTINATION disagg)
endif()
message(STATUS "disagg: NVSHMEM transport: ${DISAGG_WITH_NVSHMEM}")

# ---- CUTLASS grouped GEMM (expert_gemm on CUDA) ----------------------------------------------
set(DISAGG_CUTLASS "AUTO" CACHE STRING "Build the CUTLASS grouped GEMM: AUTO, ON or OFF")
set(DISAGG_WITH_CUTLASS OFF)
if(NOT DISAGG_CUTLASS STREQUAL "OFF")
  disagg_wheel_dir(_cutlass_inc
    "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")
  if(_cutlass_inc AND EXISTS "${_cutlass_inc}/cutlass/cutlass.h")
    set(DISAGG_WITH_CUTLASS ON)
  elseif(DISAGG_CUTLASS STREQUAL "ON")
    message(FATAL_ERROR "DISAGG_CUTLASS=ON but the nvidia-cutlass wheel is not installed for "
                        "${Python_EXECUTABLE} (pip install nvidia-cutlass)")
  endif()
endif()
if(DISAGG_WITH_CUTLASS)
  # Its own object library: CUTLASS headers, no torch headers (and none of torch's flags).
  add_library(disagg_cutlass OBJECT csrc/cuda/cutlass/grouped_gemm.cu)
  target_include_directories(disagg_cutlass PRIVATE "${_cutlass_inc}")
  set_target_properties(disagg_cutlass PROPERTIES CUDA_ARCHITECTURES "${DISAGG_CUDA_ARCHS}"
                        CUDA_STANDARD 17 POSITION_INDEPENDENT_CODE ON)
  target_compile_options(disagg_cutlass PRIVATE
                         $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr -lineinfo>)
  target_sources(_C PRIVATE $<TARGET_OBJECTS:disagg_cutlass>)
  # only the op that calls it needs to know (toggling CUTLASS then recompiles one file, not _C)
  set_property(SOURCE csrc/cuda/expert_gemm.cu APPEND PROPERTY COMPILE_DEFINITIONS
               DISAGG_WITH_CUTLASS=1)
  # The Hopper kernel (TMA + WGMMA) exists only for sm_90a: its own object library, built for
  # that architecture alone, when the list has it.
  if("90a" IN_LIST DISAGG_CUDA_ARCHS)
    add_library(disagg_cutlass_sm90 OBJECT csrc/cuda/cutlass/grouped_gemm_sm90.cu)
    target_include_directories(disagg_cutlass_sm90 PRIVATE "${_cutlass_inc}")
    set_target_properties(disagg_cutlass_sm90 PROPERTIES CUDA_ARCHITECTURES "90a"
                          CUDA_STANDARD 17 POSITION_INDEPENDENT_CODE ON)
    target_compile_options(disagg_cutlass_sm90 PRIVATE
                           $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr -lineinfo>)
    target_sources(_C PRIVATE $<TARGET_OBJECTS:disagg_cutlass_sm90>)
    set_property(SOURCE csrc/cuda/expert_gemm.cu APPEND PROPERTY COMPILE_DEFINITIONS
                 DISAGG_WITH_CUTLASS_SM90=1)
    set(DISAGG_WITH_CUTLASS_SM90 ON)
  endif()
endif()
message(STATUS "disagg: CUTLASS grouped GEMM: ${DISAGG_WITH_CUTLASS} (Hopper kernel: ${DISAGG_WITH_CUTLASS_SM90})")
