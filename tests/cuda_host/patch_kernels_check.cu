// Host-only replay of the split_patches and merge_patches CUDA kernels (no GPU needed).
//
// The kernels have never run on a GPU. tests/test_split_patches.py / test_merge_patches.py
// already check their per-pixel arithmetic on the host; this program checks the whole kernels:
// the launch grid, the block / thread -> pixel / window / channel mapping, the bounds guards and
// (merge) the shared-memory staging and the NCHW transpose. It
//   * includes kernels/split_patches.cu and kernels/merge_patches.cu, and runs their per-thread
//     bodies split_thread / merge_thread (the __global__ kernels are one call to these, passing
//     blockIdx, threadIdx, their __shared__ arrays and __syncthreads) for every (blockIdx,
//     threadIdx) of the grid and block that the kernels' launch_typed would use (their dim3
//     expressions are repeated here; they cannot be called, they contain the <<<>>> launch);
//   * merge: runs the 256 threads of a block as cooperative fibers (ucontext), switching at the
//     kernel's __syncthreads, so that every thread's writes to the block's shared memory
//     (`taps`, `tile`) before a barrier are seen by all threads after it, exactly as on the
//     device. A barrier that only part of the block reaches (some threads exited or are at
//     another barrier) is an error. Each merge case is replayed twice, with the threads of each
//     phase run in increasing and in decreasing order: a race between threads inside a phase
//     would make the two outputs differ. The shared memory of each block starts poisoned
//     (`tile` NaN, `taps` offsets huge: reading a tap no thread wrote crashes);
//   * passes the Params that csrc/split_patches.cpp / csrc/merge_patches.cpp would pass: the
//     strides come from the test (torch's strides of the input and of the output tensor the glue
//     allocates), the plain fields as the glue fills them, and the derived ones (resize scales,
//     normalisation, blend / NHWC mode) by the same .cuh helpers the glue calls;
//   * surrounds every buffer with red zones (inputs: bytes 0xFF, NaN for float types; outputs:
//     0xFF bytes = NaN, the whole output starts that way): an output red zone that changes is an
//     error, an unwritten output element stays NaN and fails the comparison in the test.
// Element types are the kernels' own (uint8_t, float, __half, __nv_bfloat16 with cuda_fp16.h /
// cuda_bf16.h's host conversions), so the rounding to fp16 / bf16 is the device's.
//
// What this cannot see: the device's FMA contraction (the host compiler does not contract
// a * b + c, so results may differ from the device's in the last float32 bit), memory
// coalescing, bank conflicts, timing, races between blocks (none write the same output).
//
// Usage: patch_kernels_check MANIFEST. Each line of MANIFEST is one case:
//   split LABEL SRC_DTYPE DST_DTYPE PRENORMALIZED B H W SB SC SH SW SRC_ELEMS IN_FILE OUT_FILE
//   merge LABEL DTYPE KIND N D0 D1 D2 S0 S1 S2 S3 SRC_ELEMS BATCH GRID PADDING BLEND
//         CHANNELS_LAST O_B O_C O_Y O_X DST_ELEMS IN_FILE OUT_FILE
// dtype codes: 0 uint8, 1 float32, 2 float16, 3 bfloat16 (the kernels' Dtype values). For
// merge, KIND 3 is (n, T, C) tokens (N D0 D1 = n T C, D2 unused, S0..S2 its strides, S3
// unused), KIND 4 is (n, C, h, w) maps (N D0 D1 D2 = n C h w, S0..S3 its strides). Input files hold SRC_ELEMS raw elements addressed by the
// strides (storage from offset 0); OUT_FILE receives the DST_ELEMS elements of the output.
// Exit 0: every case replayed (the test compares the outputs with the references); 1: an
// emulation check failed (red zone written, divergent barrier, thread-order dependence); 2: bad
// usage / input.
#include "../../kernels/merge_patches.cu"
#include "../../kernels/split_patches.cu"

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

// A named namespace, not an anonymous one: the device pass would warn about the host-only
// functions it sees unreferenced.
namespace patch_check {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "USAGE ERROR: %s\n", what.c_str());
  std::exit(2);
}

bool g_failed = false;
void fail(const std::string& what) {
  std::printf("EMULATION CHECK FAILED: %s\n", what.c_str());
  g_failed = true;
}

// ---- buffers with red zones ----
constexpr size_t kRedZone = 4096;  // bytes on each side

struct Buffer {
  std::vector<unsigned char> bytes;  // red zone | data | red zone
  size_t size = 0;                   // data bytes
  explicit Buffer(size_t n) : bytes(n + 2 * kRedZone, 0xFF), size(n) {}
  unsigned char* data() { return bytes.data() + kRedZone; }
  void fill(unsigned char v) { std::memset(data(), v, size); }
  bool red_zones_intact() const {
    for (size_t i = 0; i < kRedZone; ++i)
      if (bytes[i] != 0xFF || bytes[kRedZone + size + i] != 0xFF) return false;
    return true;
  }
};

size_t dtype_size(int code) {
  switch (code) {
    case 0: return 1;
    case 1: return 4;
    case 2: case 3: return 2;
    default: die("bad dtype code " + std::to_string(code));
  }
}

void read_file(const std::string& path, unsigned char* dst, size_t n) {
  std::ifstream f(path, std::ios::binary);
  if (!f.read(reinterpret_cast<char*>(dst), static_cast<std::streamsize>(n)) ||
      f.peek() != std::ifstream::traits_type::eof())
    die("cannot read exactly " + std::to_string(n) + " bytes from " + path);
}

void write_file(const std::string& path, const unsigned char* src, size_t n) {
  std::ofstream f(path, std::ios::binary);
  if (!f.write(reinterpret_cast<const char*>(src), static_cast<std::streamsize>(n)))
    die("cannot write " + path);
}

// ============================================================================================
// split_patches
// ============================================================================================
namespace sp = depthpro_fast::split_patches;

// The replay of split_patches' launch_typed<Tin, Tout>: the same grid / block / template choice.
template <typename Tin, typename Tout>
void replay_split(const sp::Params& p) {
  constexpr int kBlockX = sp::kBlockX, kBlockY = sp::kBlockY;
  const dim3 block(kBlockX, kBlockY);
  const dim3 grid((sp::kWindow / kBlockX) * (sp::kWindow / kBlockY), sp::kWindowsPerImage,
                  static_cast<unsigned>(p.batch));
  const Tin* src = static_cast<const Tin*>(p.src);
  Tout* dst = static_cast<Tout*>(p.dst);
  const bool identity = p.height == sp::kImage && p.width == sp::kImage;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx)
        for (unsigned ty = 0; ty < block.y; ++ty)
          for (unsigned tx = 0; tx < block.x; ++tx) {
            const uint3 b{bx, by, bz}, t{tx, ty, 0};
            if (identity) sp::split_thread<Tin, Tout, true>(src, dst, p, b, t);
            else sp::split_thread<Tin, Tout, false>(src, dst, p, b, t);
          }
}

template <typename Tin>
void replay_split_out(const sp::Params& p) {
  switch (p.dst_dtype) {
    case sp::Dtype::kFloat32: return replay_split<Tin, float>(p);
    case sp::Dtype::kFloat16: return replay_split<Tin, __half>(p);
    case sp::Dtype::kBFloat16: return replay_split<Tin, __nv_bfloat16>(p);
    default: die("split: bad output dtype");
  }
}

void run_split(std::istringstream& in, const std::string& label) {
  int src_code, dst_code, prenormalized;
  long long batch, height, width, sb, sc, sh, sw, src_elems;
  std::string in_file, out_file;
  if (!(in >> src_code >> dst_code >> prenormalized >> batch >> height >> width >> sb >> sc >>
        sh >> sw >> src_elems >> in_file >> out_file))
    die("split: bad manifest line");
  Buffer src(static_cast<size_t>(src_elems) * dtype_size(src_code));
  read_file(in_file, src.data(), src.size);
  const size_t dst_elems = static_cast<size_t>(sp::kWindowsPerImage) * batch * 3 * sp::kWindow *
                           sp::kWindow;
  Buffer dst(dst_elems * dtype_size(dst_code));

  // As csrc/split_patches.cpp fills them.
  sp::Params p{};
  p.src = src.data();
  p.src_dtype = static_cast<sp::Dtype>(src_code);
  p.batch = batch;
  p.height = height;
  p.width = width;
  p.stride_b = sb;
  p.stride_c = sc;
  p.stride_h = sh;
  p.stride_w = sw;
  p.dst = dst.data();
  p.dst_dtype = static_cast<sp::Dtype>(dst_code);
  sp::set_derived(p, prenormalized);  // the glue's own call
  switch (src_code) {
    case 0: replay_split_out<uint8_t>(p); break;
    case 1: replay_split_out<float>(p); break;
    case 2: replay_split_out<__half>(p); break;
    case 3: replay_split_out<__nv_bfloat16>(p); break;
    default: die("split: bad input dtype");
  }
  if (!src.red_zones_intact()) fail(label + ": input red zone changed");
  if (!dst.red_zones_intact()) fail(label + ": write outside the output");
  write_file(out_file, dst.data(), dst.size);
  std::printf("%s: replayed %lld blocks x %d threads\n", label.c_str(),
              static_cast<long long>(sp::kWindowsPerImage) * batch *
                  (sp::kWindow / sp::kBlockX) * (sp::kWindow / sp::kBlockY),
              sp::kBlockX * sp::kBlockY);
}

// ============================================================================================
// merge_patches: one block at a time, its threads as fibers
// ============================================================================================
namespace mp = depthpro_fast::merge_patches;

class BlockReplay {
 public:
  using Body = std::function<void(const uint3& thread_idx)>;

  explicit BlockReplay(dim3 block)
      : block_(block), n_(static_cast<int>(block.x * block.y * block.z)), fibers_(n_) {
    for (Fiber& f : fibers_) f.stack.resize(kStack);
  }

  // Runs one block: every thread executes `body` from the start; a thread that calls sync()
  // waits until every thread of the block has called it. `reverse`: the order in which the
  // threads of each phase run.
  void run(const Body& body, bool reverse, const std::string& label) {
    body_ = &body;
    for (int i = 0; i < n_; ++i) {
      Fiber& f = fibers_[i];
      f.state = kReady;
      f.barriers = 0;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = &sched_;
      makecontext(&f.ctx, reinterpret_cast<void (*)()>(&BlockReplay::entry), 1, i);
    }
    current_replay() = this;
    for (;;) {
      for (int k = 0; k < n_; ++k) {
        const int i = reverse ? n_ - 1 - k : k;
        if (fibers_[i].state != kReady) continue;
        current_ = i;
        swapcontext(&sched_, &fibers_[i].ctx);
      }
      // Everyone is either done or waiting at a barrier.
      int done = 0, waiting = 0;
      for (const Fiber& f : fibers_) (f.state == kDone ? done : waiting) += 1;
      if (waiting == 0) break;
      if (done != 0) {
        fail(label + ": __syncthreads reached by " + std::to_string(waiting) + " of " +
             std::to_string(n_) + " threads (the others exited)");
        // finish anyway, so that the fibers do not stay suspended
      }
      int count = -1;  // __syncthreads calls so far of the waiting threads: all the same
      for (const Fiber& f : fibers_) {
        if (f.state != kAtBarrier) continue;
        if (count >= 0 && f.barriers != count) {
          fail(label + ": threads wait at different barriers");
          break;
        }
        count = f.barriers;
      }
      for (Fiber& f : fibers_)
        if (f.state == kAtBarrier) f.state = kReady;
    }
  }

  // __syncthreads() of the running thread.
  void sync() {
    Fiber& f = fibers_[current_];
    f.state = kAtBarrier;
    f.barriers += 1;
    swapcontext(&f.ctx, &sched_);
  }

  static BlockReplay*& current_replay() {
    static BlockReplay* r = nullptr;
    return r;
  }

 private:
  static constexpr size_t kStack = 256 * 1024;
  enum State { kReady, kAtBarrier, kDone };
  struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    State state = kReady;
    int barriers = 0;
  };

  static void entry(int i) {
    BlockReplay* r = current_replay();
    const unsigned bx = r->block_.x, by = r->block_.y;
    const uint3 t{static_cast<unsigned>(i) % bx, (static_cast<unsigned>(i) / bx) % by,
                  static_cast<unsigned>(i) / (bx * by)};
    (*r->body_)(t);
    r->fibers_[i].state = kDone;
    // returning resumes uc_link = the scheduler
  }

  dim3 block_;
  int n_;
  std::vector<Fiber> fibers_;
  ucontext_t sched_{};
  int current_ = 0;
  const Body* body_ = nullptr;
};

// The `sync` merge_thread calls: the replay's barrier. (__host__ __device__ only because
// merge_thread is; the device version is never compiled into a kernel.)
struct HostSync {
  __host__ __device__ void operator()() const {
#ifdef __CUDA_ARCH__
    __trap();
#else
    BlockReplay::current_replay()->sync();
#endif
  }
};

// The replay of merge_patches' launch_typed<T>: the same grid and block.
template <typename T>
void replay_merge(const mp::Params& p, bool reverse, const std::string& label) {
  constexpr int kTile = mp::kTile, kRows = mp::kRows;
  const dim3 block(kTile, kRows);
  const int64_t npix = p.out_h * p.out_w;
  const dim3 grid(static_cast<unsigned>((npix + kTile - 1) / kTile),
                  static_cast<unsigned>((p.channels + kTile - 1) / kTile),
                  static_cast<unsigned>(p.batch));
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  BlockReplay replay(block);
  // The block's shared memory (the kernel's __shared__ taps / tile), poisoned before each block.
  mp::PixelTaps taps[kTile];
  float tile[kTile][kTile + 1];
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(taps, 0x7F, sizeof(taps));  // offsets ~2^62: reading an unwritten tap faults
        std::memset(tile, 0xFF, sizeof(tile));  // NaN
        const uint3 b{bx, by, bz};
        const BlockReplay::Body body = [&](const uint3& t) {
          mp::merge_thread<T, HostSync>(src, dst, p, b, t, taps, tile, HostSync{});
        };
        replay.run(body, reverse, label);
      }
}

void run_merge(std::istringstream& in, const std::string& label) {
  int code, kind, blend, channels_last;
  long long n, d0, d1, d2, s0, s1, s2, s3, src_elems, batch, grid, padding;
  long long o_b, o_c, o_y, o_x, dst_elems;
  std::string in_file, out_file;
  if (!(in >> code >> kind >> n >> d0 >> d1 >> d2 >> s0 >> s1 >> s2 >> s3 >> src_elems >> batch >>
        grid >> padding >> blend >> channels_last >> o_b >> o_c >> o_y >> o_x >> dst_elems >>
        in_file >> out_file))
    die("merge: bad manifest line");
  (void)n;
  const size_t esize = dtype_size(code);
  Buffer src(static_cast<size_t>(src_elems) * esize);
  read_file(in_file, src.data(), src.size);

  // As csrc/merge_patches.cpp fills them.
  mp::Params p{};
  int64_t channels = 0, h = 0, w = 0;
  if (kind == 3) {  // (n, 1 + h*w, C): d0 = T, d1 = C; strides s0 s1 s2
    const int64_t t = d0;
    const auto side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(t - 1))));
    if (side * side != t - 1) die("merge: T is not 1 + side^2");
    channels = d1;
    h = w = side;
    p.s_n = s0;
    p.s_c = s2;
    p.s_x = s1;
    p.s_y = side * s1;
    p.src_offset = s1;
  } else if (kind == 4) {  // (n, C, h, w)
    channels = d0;
    h = d1;
    w = d2;
    p.s_n = s0;
    p.s_c = s1;
    p.s_y = s2;
    p.s_x = s3;
    p.src_offset = 0;
  } else {
    die("merge: bad kind");
  }
  const int64_t out_h = grid * h - 2 * padding * (grid - 1);
  const int64_t out_w = grid * w - 2 * padding * (grid - 1);
  Buffer dst(static_cast<size_t>(dst_elems) * esize);
  p.src = src.data();
  p.dst = dst.data();
  p.o_b = o_b;
  p.o_c = o_c;
  p.o_y = o_y;
  p.o_x = o_x;
  p.dtype = static_cast<mp::Dtype>(code);
  p.batch = batch;
  p.channels = channels;
  p.out_h = out_h;
  p.out_w = out_w;
  p.grid = static_cast<int>(grid);
  p.padding = static_cast<int>(padding);
  p.win_h = static_cast<int>(h);
  p.win_w = static_cast<int>(w);
  mp::set_mode(p, blend, channels_last);  // the glue's own call

  // Replay twice, threads of each phase in increasing then decreasing order.
  std::vector<unsigned char> first;
  for (int pass = 0; pass < 2; ++pass) {
    dst.fill(0xFF);  // NaN
    const bool reverse = pass == 1;
    switch (code) {
      case 1: replay_merge<float>(p, reverse, label); break;
      case 2: replay_merge<__half>(p, reverse, label); break;
      case 3: replay_merge<__nv_bfloat16>(p, reverse, label); break;
      default: die("merge: bad dtype");
    }
    if (!dst.red_zones_intact()) fail(label + ": write outside the output");
    if (pass == 0) first.assign(dst.data(), dst.data() + dst.size);
    else if (std::memcmp(first.data(), dst.data(), dst.size) != 0)
      fail(label + ": output depends on the order of the threads (a shared-memory race)");
  }
  if (!src.red_zones_intact()) fail(label + ": input red zone changed");
  write_file(out_file, dst.data(), dst.size);
  const int64_t npix = out_h * out_w;
  std::printf("%s: replayed %lld blocks x %d threads, twice (channels_last path: %s)\n",
              label.c_str(),
              static_cast<long long>((npix + mp::kTile - 1) / mp::kTile *
                                     ((channels + mp::kTile - 1) / mp::kTile) * batch),
              mp::kTile * mp::kRows, p.channels_last ? "yes" : "no");
}

}  // namespace patch_check

using namespace patch_check;

int main(int argc, char** argv) {
  if (argc != 2) die(std::string("usage: ") + argv[0] + " MANIFEST");
  std::ifstream manifest(argv[1]);
  if (!manifest) die(std::string("cannot open ") + argv[1]);
  std::string line;
  int cases = 0;
  while (std::getline(manifest, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream in(line);
    std::string op, label;
    in >> op >> label;
    if (op == "split") run_split(in, label);
    else if (op == "merge") run_merge(in, label);
    else die("unknown op " + op);
    std::fflush(stdout);
    ++cases;
  }
  std::printf(g_failed ? "SOME EMULATION CHECKS FAILED\n" : "replayed %d cases\n", cases);
  return g_failed ? 1 : 0;
}
