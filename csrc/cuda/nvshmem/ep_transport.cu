// Expert-parallel all-to-all over NVSHMEM: the GPU transport planned behind EPDispatcher. Each
// PE writes the rows it sends to PE r straight into r's symmetric receive buffer (its own slot,
// indexed by the sender) with a put-with-signal; the receiver waits on one signal per sender and
// copies the landed rows out in sender order, the same result as torch.distributed's
// all_to_all_single with uneven splits.
//
// Status: compiled and device-linked against nvidia-nvshmem-cu13 by scripts/nvshmem_check.sh;
// not linked into the extension, not bound to Python, never run. Kept out of csrc/cuda/*.cu (the
// extension's glob) because NVSHMEM device code needs relocatable device code and its own
// device link step.
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

namespace disagg {
namespace cuda {
namespace nvshmem_ep {

// Symmetric state: every PE allocates the same sizes collectively.
struct Buffers {
  unsigned char* recv = nullptr;  // [npes, max_rows, row_bytes]: slot s holds rows from PE s
  uint64_t* signal = nullptr;     // [npes]: signal[s] == epoch once PE s's rows have landed
  int64_t max_rows = 0;           // rows one PE may send to one other PE per call
  int64_t row_bytes = 0;
  int npes = 0;
};

// Bytes of the bootstrap id that rank 0 broadcasts.
size_t unique_id_bytes() { return sizeof(nvshmemx_uniqueid_t); }

// Rank 0 makes the id; the caller broadcasts its bytes (e.g. over torch.distributed) to all.
int unique_id(void* out) { return nvshmemx_get_uniqueid(static_cast<nvshmemx_uniqueid_t*>(out)); }

// Every rank, with the broadcast id, after selecting its CUDA device.
int init(const void* uid, int rank, int nranks) {
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int rc = nvshmemx_set_attr_uniqueid_args(rank, nranks,
                                           static_cast<const nvshmemx_uniqueid_t*>(uid), &attr);
  if (rc != 0) return rc;
  return nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr);
}

// Collective: sizes must be equal on every PE (max_rows from the max tokens per rank).
int alloc_buffers(Buffers* b, int64_t max_rows, int64_t row_bytes) {
  b->npes = nvshmem_n_pes();
  b->max_rows = max_rows;
  b->row_bytes = row_bytes;
  b->recv = static_cast<unsigned char*>(
      nvshmem_malloc(static_cast<size_t>(b->npes) * max_rows * row_bytes));
  b->signal = static_cast<uint64_t*>(nvshmem_malloc(sizeof(uint64_t) * b->npes));
  if (b->recv == nullptr || b->signal == nullptr) return -1;
  if (cudaMemset(b->signal, 0, sizeof(uint64_t) * b->npes) != cudaSuccess) return -1;
  if (cudaDeviceSynchronize() != cudaSuccess) return -1;
  nvshmem_barrier_all();  // nobody signals a PE whose signals are not cleared yet
  return 0;
}

void free_buffers(Buffers* b) {
  nvshmem_free(b->recv);
  nvshmem_free(b->signal);
  *b = Buffers{};
}

void finalize() { nvshmem_finalize(); }

namespace {

// Block r sends this PE's rows for PE r: send_offsets [npes+1] in rows (prefix of the splits).
__global__ void put_kernel(const unsigned char* __restrict__ x,
                           const int64_t* __restrict__ send_offsets, Buffers b, uint64_t epoch) {
  const int r = blockIdx.x;
  const int me = nvshmem_my_pe();
  int64_t rows = send_offsets[r + 1] - send_offsets[r];
  if (rows > b.max_rows) rows = b.max_rows;  // the caller checks splits; never write past a slot
  if (rows < 0) rows = 0;
  unsigned char* dst = b.recv + static_cast<int64_t>(me) * b.max_rows * b.row_bytes;
  const unsigned char* src = x + send_offsets[r] * b.row_bytes;
  if (rows > 0) {
    nvshmemx_putmem_signal_nbi_block(dst, src, static_cast<size_t>(rows * b.row_bytes),
                                     b.signal + me, epoch, NVSHMEM_SIGNAL_SET, r);
  } else if (threadIdx.x == 0) {
    nvshmemx_signal_op(b.signal + me, epoch, NVSHMEM_SIGNAL_SET, r);
  }
  __syncthreads();
  if (threadIdx.x == 0) nvshmem_quiet();  // complete this PE's puts before the kernel ends
}

// Blocks (s, c): wait for PE s's rows, then copy them to out at recv_offsets[s] (rows).
__global__ void unpack_kernel(unsigned char* __restrict__ out,
                              const int64_t* __restrict__ recv_offsets, Buffers b,
                              uint64_t epoch) {
  const int s = blockIdx.x;
  if (threadIdx.x == 0) nvshmem_signal_wait_until(b.signal + s, NVSHMEM_CMP_GE, epoch);
  __syncthreads();
  int64_t rows = recv_offsets[s + 1] - recv_offsets[s];
  if (rows > b.max_rows) rows = b.max_rows;
  const int64_t bytes = rows > 0 ? rows * b.row_bytes : 0;
  const unsigned char* src = b.recv + static_cast<int64_t>(s) * b.max_rows * b.row_bytes;
  unsigned char* dst = out + recv_offsets[s] * b.row_bytes;
  const int64_t tid = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  const bool vec = (b.row_bytes % 16) == 0 && (reinterpret_cast<uintptr_t>(dst) % 16) == 0;
  if (vec) {  // 16-byte copies; slots are 16-byte aligned when row_bytes is
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (int64_t i = tid; i < bytes / 16; i += stride) d4[i] = s4[i];
  } else {
    for (int64_t i = tid; i < bytes; i += stride) dst[i] = src[i];
  }
}

}  // namespace

// Rows x[send_offsets[r] : send_offsets[r+1]] (row_bytes each) go to PE r; out receives PE s's
// rows at recv_offsets[s]. Offsets are device arrays of npes+1 rows; every split must be at most
// b.max_rows. Stream-ordered, no host synchronization.
cudaError_t all_to_all(const void* x, const int64_t* send_offsets, const int64_t* recv_offsets,
                       void* out, const Buffers& b, uint64_t epoch, cudaStream_t stream) {
  nvshmemx_barrier_all_on_stream(stream);
  put_kernel<<<b.npes, 256, 0, stream>>>(static_cast<const unsigned char*>(x), send_offsets, b,
                                         epoch);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  unpack_kernel<<<dim3(b.npes, 16), 256, 0, stream>>>(static_cast<unsigned char*>(out),
                                                      recv_offsets, b, epoch);
  return cudaGetLastError();
}

}  // namespace nvshmem_ep
}  // namespace cuda
}  // namespace disagg
