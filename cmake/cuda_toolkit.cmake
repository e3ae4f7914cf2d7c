# Finds the CUDA toolkit before torch's CMake config does, and smooths over two things that
# config trips on:
#  * it still uses the old FindCUDA, which guesses the toolkit from the nvcc on PATH; when that
#    nvcc is a wrapper script, or the toolkit keeps its libraries in lib/ instead of lib64/, the
#    guess fails ("Caffe2 version uses CUDA but I cannot find the CUDA libraries"). We hand it
#    the toolkit that CMake's own compiler detection found.
#  * it declares targets for cuBLAS, NVRTC, cuFFT, cuRAND and the driver (CUDA::*). A slim
#    toolkit (compiler + runtime only, the libraries coming from torch's nvidia-* wheels) lacks
#    them. The extension calls none of them directly (libtorch_cuda brings its own), so missing
#    ones become empty targets instead of failing the configuration.
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
get_filename_component(_disagg_cuda_root "${CUDAToolkit_BIN_DIR}" DIRECTORY)
set(CUDA_TOOLKIT_ROOT_DIR "${_disagg_cuda_root}")
set(CUDA_NVCC_EXECUTABLE "${CUDAToolkit_NVCC_EXECUTABLE}")
foreach(_lib cuda_driver cublas cublasLt cufft cufft_static_nocallback curand nvrtc
        nvToolsExt nvtx3 cuFile cupti cusparse cusolver nvJitLink)
  if(NOT TARGET CUDA::${_lib})
    add_library(CUDA::${_lib} INTERFACE IMPORTED)
    list(APPEND _disagg_cuda_missing ${_lib})
  endif()
endforeach()
# Torch links NVRTC by file path (CUDA_nvrtc_LIBRARY). A slim toolkit has none; torch's wheels
# ship it as nvidia/cu13/lib/libnvrtc.so.13 next to torch (only a soname, no plain .so).
if(NOT CUDA_nvrtc_LIBRARY)
  get_filename_component(_disagg_site "${_torch_prefix}/../../.." ABSOLUTE)
  find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
               HINTS "${CUDAToolkit_LIBRARY_DIR}" "${_disagg_site}/nvidia/cu13/lib"
                     "${_disagg_site}/nvidia/cuda_nvrtc/lib")
  if(NOT CUDA_nvrtc_LIBRARY)
    set(CUDA_nvrtc_LIBRARY "" CACHE FILEPATH "NVRTC (not found; the extension does not use it)" FORCE)
  endif()
endif()
if(_disagg_cuda_missing)
  message(STATUS "disagg: CUDA libraries not in the toolkit (unused by the extension): ${_disagg_cuda_missing}")
endif()
message(STATUS "disagg: CUDA toolkit ${CUDAToolkit_VERSION} at ${_disagg_cuda_root}")
