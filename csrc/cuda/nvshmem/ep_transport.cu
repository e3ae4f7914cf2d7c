// Expert-parallel all-to-all over NVSHMEM: the GPU transport behind EPDispatcher(transport=
// "nvshmem"). Each PE writes the rows it sends to PE r straight into r's symmetric receive
// buffer (its own slot, indexed by the sender) with a put-with-signal; the receiver waits on one
// signal per sender and copies the landed rows out in sender order, the same result as
// torch.distributed's all_to_all_single with uneven splits.
//
// Built as its own shared library (libdisagg_nvshmem.so, CMake option DISAGG_NVSHMEM): NVSHMEM
// device code needs relocatable device code and a device link with libnvshmem_device.a, which
// the torch extension does not. No torch here: python/disagg/moe/nvshmem.py loads the library
// with ctypes and passes raw device pointers and the current CUDA stream.
//
// Protocol of one all_to_all (epoch = a counter the caller increases by one per call, from 1):
//   1. barrier on the stream: every PE has finished reading its slots from the previous call,
//      so they may be overwritten;
//   2. one block per destination r: put this PE's rows for r into r's slot [my_pe], then set
//      r's signal[my_pe] = epoch (NVSHMEM delivers the signal after the data);
//   3. blocks per sender s wait until signal[s] >= epoch, then copy slot s to out.
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>
#include <new>

namespace disagg {
namespace cuda {
namespace nvshmem_ep {

// Symmetric state: every PE allocates the same sizes collectively.
struct Buffers {
  unsigned char* recv = nullptr;  // [npes, slot_bytes]: slot s holds the rows from PE s
  uint64_t* signal = nullptr;     // [npes]: signal[s] == epoch once PE s's rows have landed
  int64_t slot_bytes = 0;         // bytes one PE may send to one other PE per call
  int npes = 0;
};

namespace {

// Block r sends this PE's rows for PE r: send_offsets [npes+1] in rows (prefix of the splits).
__global__ void put_kernel(const unsigned char* __restrict__ x,
                           const int64_t* __restrict__ send_offsets, Buffers b, int64_t row_bytes,
                           uint64_t epoch) {
  const int r = blockIdx.x;
  const int me = nvshmem_my_pe();
  int64_t bytes = (send_offsets[r + 1] - send_offsets[r]) * row_bytes;
  if (bytes > b.slot_bytes) bytes = b.slot_bytes;  // the caller checks splits; never overflow
  if (bytes < 0) bytes = 0;
  unsigned char* dst = b.recv + static_cast<int64_t>(me) * b.slot_bytes;
  const unsigned char* src = x + send_offsets[r] * row_bytes;
  if (bytes > 0) {
    nvshmemx_putmem_signal_nbi_block(dst, src, static_cast<size_t>(bytes), b.signal + me, epoch,
                                     NVSHMEM_SIGNAL_SET, r);
  } else if (threadIdx.x == 0) {
    nvshmemx_signal_op(b.signal + me, epoch, NVSHMEM_SIGNAL_SET, r);
  }
  __syncthreads();
  if (threadIdx.x == 0) nvshmem_quiet();  // complete this PE's puts before the kernel ends
}

// Blocks (s, c): wait for PE s's rows, then copy them to out at recv_offsets[s] (rows).
__global__ void unpack_kernel(unsigned char* __restrict__ out,
                              const int64_t* __restrict__ recv_offsets, Buffers b,
                              int64_t row_bytes, uint64_t epoch) {
  const int s = blockIdx.x;
  if (threadIdx.x == 0) nvshmem_signal_wait_until(b.signal + s, NVSHMEM_CMP_GE, epoch);
  __syncthreads();
  int64_t bytes = (recv_offsets[s + 1] - recv_offsets[s]) * row_bytes;
  if (bytes > b.slot_bytes) bytes = b.slot_bytes;
  if (bytes < 0) bytes = 0;
  const unsigned char* src = b.recv + static_cast<int64_t>(s) * b.slot_bytes;
  unsigned char* dst = out + recv_offsets[s] * row_bytes;
  const int64_t tid = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  const bool vec = (row_bytes % 16) == 0 && (reinterpret_cast<uintptr_t>(dst) % 16) == 0;
  if (vec) {  // 16-byte copies; slots are 16-byte aligned (slot_bytes is a multiple of 16)
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (int64_t i = tid; i < bytes / 16; i += stride) d4[i] = s4[i];
  } else {
    for (int64_t i = tid; i < bytes; i += stride) dst[i] = src[i];
  }
}

}  // namespace
}  // namespace nvshmem_ep
}  // namespace cuda
}  // namespace disagg

using disagg::cuda::nvshmem_ep::Buffers;

// ---- C ABI (ctypes): every function returns 0 or an error code (cudaError_t or NVSHMEM's) ----
extern "C" {

// Bytes of the bootstrap id that rank 0 makes and the caller broadcasts.
int disagg_nvshmem_uid_bytes() { return static_cast<int>(sizeof(nvshmemx_uniqueid_t)); }

int disagg_nvshmem_get_uid(void* out) {
  return nvshmemx_get_uniqueid(static_cast<nvshmemx_uniqueid_t*>(out));
}

// Every rank, with the broadcast id; selects `device` first (NVSHMEM binds a PE to the current
// device at initialization).
int disagg_nvshmem_init(const void* uid, int rank, int nranks, int device) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int rc = nvshmemx_set_attr_uniqueid_args(rank, nranks,
                                           static_cast<const nvshmemx_uniqueid_t*>(uid), &attr);
  if (rc != 0) return rc;
  return nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr);
}

int disagg_nvshmem_my_pe() { return nvshmem_my_pe(); }
int disagg_nvshmem_n_pes() { return nvshmem_n_pes(); }

// Collective (same slot_bytes on every PE). Returns a handle, or nullptr when the symmetric heap
// is too small (NVSHMEM_SYMMETRIC_SIZE) or CUDA fails.
void* disagg_nvshmem_create(int64_t slot_bytes) {
  auto* b = new (std::nothrow) Buffers;
  if (b == nullptr) return nullptr;
  b->npes = nvshmem_n_pes();
  b->slot_bytes = (slot_bytes + 15) / 16 * 16;
  b->recv = static_cast<unsigned char*>(
      nvshmem_malloc(static_cast<size_t>(b->npes) * static_cast<size_t>(b->slot_bytes)));
  b->signal = static_cast<uint64_t*>(nvshmem_malloc(sizeof(uint64_t) * b->npes));
  bool ok = b->recv != nullptr && b->signal != nullptr;
  if (ok) ok = cudaMemset(b->signal, 0, sizeof(uint64_t) * b->npes) == cudaSuccess;
  if (ok) ok = cudaDeviceSynchronize() == cudaSuccess;
  nvshmem_barrier_all();  // nobody signals a PE whose signals are not cleared yet
  if (!ok) {
    if (b->recv) nvshmem_free(b->recv);
    if (b->signal) nvshmem_free(b->signal);
    delete b;
    return nullptr;
  }
  return b;
}

// Collective, like nvshmem_free.
void disagg_nvshmem_destroy(void* handle) {
  auto* b = static_cast<Buffers*>(handle);
  if (b == nullptr) return;
  nvshmem_free(b->recv);
  nvshmem_free(b->signal);
  delete b;
}

void disagg_nvshmem_finalize() { nvshmem_finalize(); }

const char* disagg_nvshmem_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

// Rows x[send_offsets[r] : send_offsets[r+1]] (row_bytes each) go to PE r; out receives PE s's
// rows at recv_offsets[s]. Offsets are device arrays of npes+1 rows; every split times row_bytes
// must be at most the slot size (larger ones are cut). Stream-ordered, no host synchronization.
int disagg_nvshmem_all_to_all(void* handle, const void* x, const int64_t* send_offsets,
                              const int64_t* recv_offsets, void* out, int64_t row_bytes,
                              uint64_t epoch, void* stream_ptr) {
  const auto* b = static_cast<const Buffers*>(handle);
  if (b == nullptr || row_bytes <= 0) return static_cast<int>(cudaErrorInvalidValue);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  nvshmemx_barrier_all_on_stream(stream);
  disagg::cuda::nvshmem_ep::put_kernel<<<b->npes, 256, 0, stream>>>(
      static_cast<const unsigned char*>(x), send_offsets, *b, row_bytes, epoch);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  disagg::cuda::nvshmem_ep::unpack_kernel<<<dim3(b->npes, 16), 256, 0, stream>>>(
      static_cast<unsigned char*>(out), recv_offsets, *b, row_bytes, epoch);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
