// Execution model of a Metal compute dispatch on one CPU thread: every GPU thread is a fiber,
// threadgroups run one after another (in a seeded random order), threadgroup_barrier waits for
// all live threads of the threadgroup and simd_* collectives for the live lanes of one
// simdgroup. Device memory goes through bounds-checked pointers that count the bytes moved.
#pragma once

#include <new>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/time.h>
#include <source_location>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "mlxe_math.h"

// A hand-written context switch on x86-64 ELF (Linux); ucontext elsewhere (or with
// -DMLXE_UCONTEXT).
#if defined(__x86_64__) && defined(__ELF__) && !defined(MLXE_UCONTEXT)
#define MLXE_ASM_SWITCH 1
#else
#define MLXE_ASM_SWITCH 0
#include <ucontext.h>
#endif

namespace mlxe {

using metal::uint3;

// One kernel argument buffer. The layout is shared with Python (ctypes).
struct Buffer {
  void* data;
  int64_t nbytes;
  int64_t itemsize;
  const char* name;
  const char* dtype;
  int32_t is_output;
  int32_t ndim;
  const int32_t* shape;
  const int64_t* strides;
  int64_t bytes_read;
  int64_t bytes_written;
};

enum State : int { READY = 0, AT_BARRIER = 1, AT_SIMD = 2, DONE = 3 };

struct Site {
  const char* file;
  uint32_t line;
  uint32_t column;
  const char* what;
};

inline bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && a.column == b.column && strcmp(a.file, b.file) == 0 &&
         strcmp(a.what, b.what) == 0;
}

struct Fiber;
typedef void (*Resolver)(Fiber** lanes);

constexpr int kSimdWidth = 32;
constexpr int kMaxThreads = 1024;
constexpr int64_t kMaxThreadgroupMemory = 32768;
constexpr size_t kStackSize = 256 * 1024;
constexpr int kMaxThreadgroupSites = 256;

struct Fiber {
  void* sp;
#if !MLXE_ASM_SWITCH
  ucontext_t ctx;
#endif
  int state;
  uint index;
  uint3 pos;
  uint3 gpos;
  Site site;
  Resolver resolve;
  int64_t arg;
  alignas(32) unsigned char in[32];
  alignas(32) unsigned char in2[32];
  alignas(32) unsigned char out[32];
};

struct ThreadgroupSite {
  void* ptr;
  int64_t size;   // bytes counted against the 32 KiB limit
  int64_t alloc;  // bytes allocated: the data and its race-check shadow
  const char* name;
};

struct Launch {
  Buffer* bufs;
  uint3 grid;
  uint3 group;
  uint3 tgs_per_grid;
  uint3 tg_pos;
  uint3 tg_size;
  uint tg_threads;
  uint dispatch_threads;
  void (*thread_main)(Fiber*);
  char* err;
  int64_t errlen;
  bool failed;
  int64_t tg_memory;
  ThreadgroupSite tg_sites[kMaxThreadgroupSites];
  // Barriers with mem_flags::mem_threadgroup released so far in the running threadgroup, and
  // simdgroup_barrier(mem_threadgroup)s per simdgroup: they order threadgroup-memory accesses.
  uint32_t tg_epoch;
  uint32_t sg_epoch[kMaxThreads / kSimdWidth];
};

// A launch runs on one OS thread; the Python side serializes launches of a library.
inline Launch L;
inline sigjmp_buf fault_jump;
inline Fiber* cur = nullptr;
inline void* sched_sp = nullptr;
#if !MLXE_ASM_SWITCH
inline ucontext_t sched_ctx;
#endif

// ---------------------------------------------------------------------------------------------
// Fibers. On x86-64 a hand-written switch (callee-saved registers + stack pointer) is ~50x
// cheaper than swapcontext, which makes a system call per switch.

#if MLXE_ASM_SWITCH
extern "C" void mlxe_switch(void** save_sp, void* to_sp);
asm(R"(
  .text
  .p2align 4
  .globl mlxe_switch
  .hidden mlxe_switch
  .type mlxe_switch,@function
mlxe_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mlxe_switch, .-mlxe_switch
)");
#endif

inline char* stack_pool = nullptr;

inline char* stack_top(int i) {
  if (!stack_pool) {
    size_t total = kStackSize * kMaxThreads;
    void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    stack_pool = static_cast<char*>(m);
    // A guard page at the bottom of every stack turns an overflow into a fault, not corruption.
    for (int k = 0; k < kMaxThreads; ++k) mprotect(stack_pool + k * kStackSize, 4096, PROT_NONE);
  }
  return stack_pool + (size_t(i) + 1) * kStackSize;
}

inline void yield_to_scheduler(Fiber* f) {
#if MLXE_ASM_SWITCH
  mlxe_switch(&f->sp, sched_sp);
#else
  swapcontext(&f->ctx, &sched_ctx);
#endif
}

inline void run_fiber(Fiber* f) {
  cur = f;
#if MLXE_ASM_SWITCH
  mlxe_switch(&sched_sp, f->sp);
#else
  swapcontext(&sched_ctx, &f->ctx);
#endif
  cur = nullptr;
}

__attribute__((noinline, used)) inline void fiber_entry() {
  Fiber* f = cur;
  L.thread_main(f);
  f->state = DONE;
  yield_to_scheduler(f);
  __builtin_unreachable();
}

inline void start_fiber(Fiber* f, int slot) {
  char* top = stack_top(slot);
#if MLXE_ASM_SWITCH
  // Frame popped by mlxe_switch: six callee-saved registers, then the return address.
  void** s = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
  s[-1] = nullptr;
  s[-2] = reinterpret_cast<void*>(&fiber_entry);
  for (int k = 3; k <= 8; ++k) s[-k] = nullptr;
  f->sp = &s[-8];
#else
  getcontext(&f->ctx);
  f->ctx.uc_stack.ss_sp = top - kStackSize + 4096;
  f->ctx.uc_stack.ss_size = kStackSize - 4096;
  f->ctx.uc_link = nullptr;
  makecontext(&f->ctx, fiber_entry, 0);
#endif
  f->state = READY;
}

// ---------------------------------------------------------------------------------------------
// Errors: the message goes to the caller's buffer; a failing GPU thread never resumes.

inline int describe_thread(char* out, size_t n, const Fiber* f) {
  return snprintf(out, n,
                  "thread_position_in_grid (%u, %u, %u) [threadgroup (%u, %u, %u), "
                  "thread_index_in_threadgroup %u, simdgroup %u, lane %u]",
                  f->gpos.x, f->gpos.y, f->gpos.z, L.tg_pos.x, L.tg_pos.y, L.tg_pos.z, f->index,
                  f->index / kSimdWidth, f->index % kSimdWidth);
}

__attribute__((format(printf, 1, 2))) inline void set_error(const char* fmt, ...) {
  if (L.failed) return;
  L.failed = true;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(L.err, size_t(L.errlen), fmt, ap);
  va_end(ap);
}

[[noreturn]] inline void abort_thread() {
  cur->state = DONE;
  yield_to_scheduler(cur);
  __builtin_unreachable();
}

[[noreturn]] __attribute__((noinline)) inline void out_of_bounds(const Buffer* b, const void* addr,
                                                                 size_t size, const char* access) {
  char who[256];
  describe_thread(who, sizeof who, cur);
  int64_t offset = static_cast<const char*>(addr) - static_cast<const char*>(b->data);
  set_error("%s of %zu bytes outside %s '%s' (%lld elements of %s): element index %lld "
            "(byte offset %lld, valid 0..%lld) by %s",
            access, size, b->is_output ? "output" : "input", b->name,
            (long long)(b->nbytes / b->itemsize), b->dtype,
            (long long)(offset >= 0 ? offset / b->itemsize : -((-offset + b->itemsize - 1) / b->itemsize)),
            (long long)offset, (long long)b->nbytes, who);
  abort_thread();
}

[[noreturn]] __attribute__((noinline)) inline void misaligned(const Buffer* b, const void* addr,
                                                              size_t align, const char* access) {
  char who[256];
  describe_thread(who, sizeof who, cur);
  int64_t offset = static_cast<const char*>(addr) - static_cast<const char*>(b->data);
  set_error("misaligned %s in %s '%s': byte offset %lld is not a multiple of %zu (the "
            "alignment of the accessed type) by %s",
            access, b->is_output ? "output" : "input", b->name, (long long)offset, align, who);
  abort_thread();
}

template <class T>
inline void touch(const Buffer* b, const T* p, bool write) {
  const char* a = reinterpret_cast<const char*>(p);
  const char* base = static_cast<const char*>(b->data);
  const char* access = write ? "write" : "read";
  if (a < base || a + sizeof(T) > base + b->nbytes) out_of_bounds(b, a, sizeof(T), access);
  if (reinterpret_cast<uintptr_t>(a) % alignof(T) != 0) misaligned(b, a, alignof(T), access);
  Buffer* counted = const_cast<Buffer*>(b);
  if (write) {
    counted->bytes_written += sizeof(T);
  } else {
    counted->bytes_read += sizeof(T);
  }
}

// Thread-local arrays: -fsanitize=bounds calls this handler (instead of the sanitizer's runtime)
// when an index into an array of known size is out of range.
struct UbsanLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct UbsanType {
  uint16_t kind;
  uint16_t info;
  char name[1];
};
struct UbsanOutOfBounds {
  UbsanLocation loc;
  const UbsanType* array_type;
  const UbsanType* index_type;
};

[[noreturn]] __attribute__((noinline)) inline void array_out_of_bounds(const UbsanOutOfBounds* d,
                                                                        void* index) {
  bool is_signed = d->index_type->info & 1;
  long long k = is_signed ? (long long)(intptr_t)index : (long long)(uintptr_t)index;
  char who[256] = "the scheduler";
  if (cur) describe_thread(who, sizeof who, cur);
  set_error("index %lld outside a thread-local array of type %s at %s:%u:%u by %s", k,
            d->array_type->name, d->loc.file, d->loc.line, d->loc.column, who);
  if (cur) abort_thread();
  siglongjmp(fault_jump, 1);
}

// ---------------------------------------------------------------------------------------------
// Device pointers: `device T*` in kernel text becomes device_ptr<T>, `constant T*` (and the
// inputs MLX binds in the constant address space) constant_ptr<T>. They do not convert into
// each other nor into raw (thread) pointers, as in Metal.

enum Space : int { DEVICE = 0, CONSTANT = 1 };

template <class T>
struct is_atomic : std::false_type {};

template <class T, int Space = DEVICE>
struct device_ptr;
template <class T>
using constant_ptr = device_ptr<T, CONSTANT>;

// A reference into a writable device buffer: reads and writes are checked and counted
// separately, which a plain T& cannot do.
template <class T>
struct dref {
  T* p;
  Buffer* b;

  T load() const {
    if (b) touch(b, p, false);
    return *p;
  }
  void store(const T& v) const {
    if (b) touch(b, p, true);
    *p = v;
  }
  operator T() const { return load(); }
  // By value, so `out[i] = local[k]` reads local[k] (bounds-checked up to k < size) rather than
  // binding a reference to it (which allows k == size, the one-past-the-end address).
  const dref& operator=(T v) const {
    store(v);
    return *this;
  }
  template <class V>
  const dref& operator=(V v) const {
    store(T(v));
    return *this;
  }
  const dref& operator=(const dref& o) const {
    store(o.load());
    return *this;
  }
#define MLXE_DREF_COMPOUND(op)            \
  template <class V>                      \
  const dref& operator op(V v) const {    \
    T t = load();                         \
    t op v;                               \
    store(t);                             \
    return *this;                         \
  }
  MLXE_DREF_COMPOUND(+=)
  MLXE_DREF_COMPOUND(-=)
  MLXE_DREF_COMPOUND(*=)
  MLXE_DREF_COMPOUND(/=)
  MLXE_DREF_COMPOUND(%=)
  MLXE_DREF_COMPOUND(&=)
  MLXE_DREF_COMPOUND(|=)
  MLXE_DREF_COMPOUND(^=)
  MLXE_DREF_COMPOUND(<<=)
  MLXE_DREF_COMPOUND(>>=)
#undef MLXE_DREF_COMPOUND
  device_ptr<T> operator&() const { return device_ptr<T>(p, b); }
};

template <class T>
struct value_of {
  using type = std::remove_cv_t<std::remove_reference_t<T>>;
};
template <class T>
struct value_of<dref<T>> {
  using type = T;
};
template <class T>
using value_t = typename value_of<std::remove_cv_t<std::remove_reference_t<T>>>::type;

template <class T, int Space>
struct device_ptr {
  using element_type = T;
  using reference =
      std::conditional_t<std::is_const_v<T> || is_atomic<std::remove_cv_t<T>>::value, T&, dref<T>>;

  T* p = nullptr;
  Buffer* b = nullptr;

  device_ptr() = default;
  device_ptr(std::nullptr_t) {}
  explicit device_ptr(T* raw) : p(raw) {}
  device_ptr(T* raw, Buffer* buf) : p(raw), b(buf) {}
  template <class S, std::enable_if_t<!std::is_convertible_v<S*, T*>, int> = 0>
  explicit device_ptr(S* raw) : p((T*)raw) {}
  template <class S, std::enable_if_t<std::is_convertible_v<S*, T*>, int> = 0>
  device_ptr(device_ptr<S, Space> o) : p(o.p), b(o.b) {}
  template <class S, std::enable_if_t<!std::is_convertible_v<S*, T*>, int> = 0>
  explicit device_ptr(device_ptr<S, Space> o) : p((T*)o.p), b(o.b) {}

  reference at(T* q) const {
    if constexpr (std::is_const_v<T>) {
      if (b) touch(b, q, false);
      return *q;
    } else if constexpr (is_atomic<std::remove_cv_t<T>>::value) {
      if (b) {
        touch(b, q, false);
        touch(b, q, true);
      }
      return *q;
    } else {
      return dref<T>{q, b};
    }
  }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  reference operator[](I i) const {
    return at(p + int64_t(i));
  }
  reference operator*() const { return at(p); }
  T* operator->() const {
    if (b) touch(b, p, !std::is_const_v<T>);
    return p;
  }

  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  device_ptr operator+(I i) const {
    return device_ptr(p + int64_t(i), b);
  }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  device_ptr operator-(I i) const {
    return device_ptr(p - int64_t(i), b);
  }
  template <class S>
  int64_t operator-(device_ptr<S, Space> o) const {
    return p - o.p;
  }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  device_ptr& operator+=(I i) {
    p += int64_t(i);
    return *this;
  }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  device_ptr& operator-=(I i) {
    p -= int64_t(i);
    return *this;
  }
  device_ptr& operator++() {
    ++p;
    return *this;
  }
  device_ptr operator++(int) {
    device_ptr r = *this;
    ++p;
    return r;
  }
  device_ptr& operator--() {
    --p;
    return *this;
  }
  device_ptr operator--(int) {
    device_ptr r = *this;
    --p;
    return r;
  }
  template <class S>
  bool operator==(device_ptr<S, Space> o) const {
    return p == o.p;
  }
  template <class S>
  bool operator!=(device_ptr<S, Space> o) const {
    return p != o.p;
  }
  template <class S>
  bool operator<(device_ptr<S, Space> o) const {
    return p < o.p;
  }
  template <class S>
  bool operator<=(device_ptr<S, Space> o) const {
    return p <= o.p;
  }
  template <class S>
  bool operator>(device_ptr<S, Space> o) const {
    return p > o.p;
  }
  template <class S>
  bool operator>=(device_ptr<S, Space> o) const {
    return p >= o.p;
  }
};

template <class I, class T, int Space, std::enable_if_t<std::is_integral_v<I>, int> = 0>
device_ptr<T, Space> operator+(I i, device_ptr<T, Space> d) {
  return d + i;
}

template <class T>
struct is_device_ptr : std::false_type {};
template <class T, int Space>
struct is_device_ptr<device_ptr<T, Space>> : std::true_type {};

// `reinterpret_cast<...>` and `const_cast<...>` in kernel text become ptr_cast<...>.
template <class To, class From>
To ptr_cast(From f) {
  if constexpr (is_device_ptr<To>::value) {
    return To(f);
  } else if constexpr (is_device_ptr<From>::value) {
    static_assert(!std::is_pointer_v<To>, "a device or constant pointer cannot be cast to a "
                  "thread pointer: Metal keeps address spaces apart");
    return (To)(f.p);
  } else {
    return (To)(f);
  }
}

template <class T>
T& scalar_arg(int i) {
  return *static_cast<T*>(L.bufs[i].data);
}
template <class T, int Space = DEVICE>
device_ptr<T, Space> buffer_arg(int i) {
  return device_ptr<T, Space>(static_cast<T*>(L.bufs[i].data), &L.bufs[i]);
}

// ---------------------------------------------------------------------------------------------
// Threadgroup memory: `threadgroup T name[N];` becomes a reference to storage shared by the
// threadgroup, poisoned (all bits set: NaN for floats) when each threadgroup starts, and
// `threadgroup T*` a bounds-checked tg_ptr (neither decays to a thread pointer).
//
// Race check (elements of at most 8 bytes, not atomics): a shadow per element remembers the
// last thread that accessed it, the element's bits then and the barrier epochs of that moment.
// An access returns a plain T&, so a write is seen at the next access, as changed bits. Any
// access to an element another thread wrote since the last threadgroup_barrier with
// mem_flags::mem_threadgroup (or, within one simdgroup, simdgroup_barrier with it) is an error.

struct TgShadow {
  uint64_t bits;
  int32_t last;
  int32_t writer;
  uint32_t last_tg, last_sg, writer_tg, writer_sg;
};

template <class T>
constexpr bool kRaceChecked = std::is_trivially_copyable_v<T> && sizeof(T) <= 8 &&
                              !std::is_array_v<T> && !is_atomic<std::remove_cv_t<T>>::value;

inline const char* tg_name(const void* storage) {
  for (auto& s : L.tg_sites)
    if (s.ptr == storage) return s.name;
  return "?";
}

[[noreturn]] __attribute__((noinline)) inline void tg_race(const void* storage, int64_t k,
                                                            int32_t writer) {
  char who[256];
  describe_thread(who, sizeof who, cur);
  set_error("threadgroup memory race on '%s'[%lld]: accessed by %s after thread_index_in_"
            "threadgroup %d (simdgroup %d) wrote it, with no threadgroup_barrier(mem_flags::"
            "mem_threadgroup) between them (simdgroup_barrier(mem_flags::mem_threadgroup) "
            "orders lanes of one simdgroup)",
            tg_name(storage), (long long)k, who, writer, writer / kSimdWidth);
  abort_thread();
}

template <class T>
inline void tg_check(TgShadow& s, const T& value, const void* storage, int64_t k) {
  uint64_t bits = 0;
  memcpy(&bits, &value, sizeof(T));
  uint64_t mask = sizeof(T) == 8 ? ~uint64_t(0) : (uint64_t(1) << (8 * sizeof(T))) - 1;
  if (((bits ^ s.bits) & mask) && s.last >= 0) {  // the last thread to access it wrote it
    s.writer = s.last;
    s.writer_tg = s.last_tg;
    s.writer_sg = s.last_sg;
  }
  int32_t me = int32_t(cur->index);
  uint32_t sg = cur->index / kSimdWidth;
  if (s.writer >= 0 && s.writer != me && s.writer_tg == L.tg_epoch &&
      !(uint32_t(s.writer) / kSimdWidth == sg && s.writer_sg != L.sg_epoch[sg]))
    tg_race(storage, k, s.writer);
  s.bits = bits;
  s.last = me;
  s.last_tg = L.tg_epoch;
  s.last_sg = L.sg_epoch[sg];
}

[[noreturn]] __attribute__((noinline)) inline void tg_out_of_range(const void* storage, int64_t k,
                                                                    size_t n) {
  char who[256];
  describe_thread(who, sizeof who, cur);
  set_error("index %lld outside threadgroup array '%s' of %zu elements by %s", (long long)k,
            tg_name(storage), n, who);
  abort_thread();
}

template <class T>
inline T& tg_element(T* v, TgShadow* shadow, size_t n, int64_t k) {
  if (k < 0 || k >= int64_t(n)) tg_out_of_range(v, k, n);
  if constexpr (kRaceChecked<T>) tg_check(shadow[k], v[k], v, k);
  return v[k];
}

template <class T>
struct tg_ptr;

template <class T, size_t N>
struct tg_array {
  static constexpr int64_t kBytes = int64_t(sizeof(T) * N);
  T v[N];  // first: the storage address names the array in messages
  TgShadow shadow[kRaceChecked<T> ? N : 1];

  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  T& operator[](I i) {
    return tg_element(v, shadow, N, int64_t(i));
  }
  template <class U, std::enable_if_t<std::is_same_v<std::remove_const_t<U>, T>, int> = 0>
  operator tg_ptr<U>() {
    return tg_ptr<U>{v, shadow, N, 0};
  }
};

// `threadgroup T*`: the array it points into, for bounds and race checks.
template <class T>
struct tg_ptr {
  using M = std::remove_const_t<T>;
  M* base = nullptr;
  TgShadow* shadow = nullptr;
  size_t n = 0;
  int64_t offset = 0;

  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  T& operator[](I i) const {
    return tg_element(base, shadow, n, offset + int64_t(i));
  }
  T& operator*() const { return (*this)[0]; }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  tg_ptr operator+(I i) const {
    return tg_ptr{base, shadow, n, offset + int64_t(i)};
  }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  tg_ptr operator-(I i) const {
    return tg_ptr{base, shadow, n, offset - int64_t(i)};
  }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  tg_ptr& operator+=(I i) {
    offset += int64_t(i);
    return *this;
  }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  tg_ptr& operator-=(I i) {
    offset -= int64_t(i);
    return *this;
  }
  operator tg_ptr<const M>() const { return tg_ptr<const M>{base, shadow, n, offset}; }
};

template <class T>
constexpr int64_t tg_bytes() {
  if constexpr (requires { T::kBytes; }) {
    return T::kBytes;
  } else {
    return int64_t(sizeof(T));
  }
}

template <class T>
T& tg_alloc(int site, const char* name) {
  ThreadgroupSite& s = L.tg_sites[site];
  if (!s.ptr) {
    s.size = tg_bytes<T>();
    s.alloc = int64_t(sizeof(T));
    s.name = name;
    L.tg_memory += s.size;
    if (L.tg_memory > kMaxThreadgroupMemory) {
      set_error("threadgroup memory: '%s' (%lld bytes) brings the total to %lld bytes, over "
                "Metal's limit of %lld bytes (32 KiB) per threadgroup",
                name, (long long)s.size, (long long)L.tg_memory, (long long)kMaxThreadgroupMemory);
      abort_thread();
    }
    s.ptr = ::operator new(sizeof(T), std::align_val_t(64));
    memset(s.ptr, 0xff, sizeof(T));
  }
  return *static_cast<T*>(s.ptr);
}

// ---------------------------------------------------------------------------------------------
// Barriers and simdgroup collectives.

enum class mem_flags : int {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(int(a) | int(b));
}

inline Site make_site(const std::source_location& loc, const char* what) {
  return Site{loc.file_name(), uint32_t(loc.line()), uint32_t(loc.column()), what};
}

inline void barrier(mem_flags flags, const std::source_location& loc) {
  Fiber* f = cur;
  f->arg = int64_t(flags);
  f->site = make_site(loc, "threadgroup_barrier");
  f->state = AT_BARRIER;
  yield_to_scheduler(f);
}

template <class T>
T load_bytes(const unsigned char* src) {
  T v;
  memcpy(&v, src, sizeof(T));
  return v;
}
template <class T>
void store_bytes(unsigned char* dst, const T& v) {
  memcpy(dst, &v, sizeof(T));
}

template <class T, class T2 = T>
T collective(const T& v, Resolver r, int64_t arg, const char* what, const std::source_location& loc,
             const T2& v2 = T2()) {
  static_assert(sizeof(T) <= 32 && sizeof(T2) <= 32, "simd collective on a type over 32 bytes");
  Fiber* f = cur;
  store_bytes(f->in, v);
  store_bytes(f->in2, v2);
  f->arg = arg;
  f->resolve = r;
  f->site = make_site(loc, what);
  f->state = AT_SIMD;
  yield_to_scheduler(f);
  return load_bytes<T>(f->out);
}

// Reads a lane that is absent (not launched, finished, or elsewhere): undefined on a GPU, so
// the result is poisoned (all bits set) to make the bug visible.
template <class T>
T poison() {
  unsigned char b[sizeof(T)];
  memset(b, 0xff, sizeof b);
  return load_bytes<T>(b);
}

struct OpSum {
  template <class T>
  static T apply(T a, T b) { return T(a + b); }
  template <class T>
  static T identity() { return T(0); }
};
struct OpProduct {
  template <class T>
  static T apply(T a, T b) { return T(a * b); }
  template <class T>
  static T identity() { return T(1); }
};
struct OpMax {
  template <class T>
  static T apply(T a, T b) { using metal::max; return max(a, b); }
};
struct OpMin {
  template <class T>
  static T apply(T a, T b) { using metal::min; return min(a, b); }
};
struct OpAnd {
  template <class T>
  static T apply(T a, T b) { return T(a & b); }
};
struct OpOr {
  template <class T>
  static T apply(T a, T b) { return T(a | b); }
};
struct OpXor {
  template <class T>
  static T apply(T a, T b) { return T(a ^ b); }
};

// Reductions over the live lanes of each group of W lanes (32: simdgroup, 4: quadgroup), as a
// pairwise tree like the hardware's butterfly.
template <class T, class Op, int W>
void resolve_reduce(Fiber** lanes) {
  for (int g = 0; g < kSimdWidth; g += W) {
    T vals[W];
    int n = 0;
    for (int l = g; l < g + W; ++l)
      if (lanes[l]) vals[n++] = load_bytes<T>(lanes[l]->in);
    if (n == 0) continue;
    while (n > 1) {
      int m = 0;
      for (int i = 0; i + 1 < n; i += 2) vals[m++] = Op::apply(vals[i], vals[i + 1]);
      if (n & 1) vals[m++] = vals[n - 1];
      n = m;
    }
    for (int l = g; l < g + W; ++l)
      if (lanes[l]) store_bytes(lanes[l]->out, vals[0]);
  }
}

template <class T, class Op, bool Inclusive, int W>
void resolve_prefix(Fiber** lanes) {
  for (int g = 0; g < kSimdWidth; g += W) {
    T acc = Op::template identity<T>();
    for (int l = g; l < g + W; ++l) {
      if (!lanes[l]) continue;
      T v = load_bytes<T>(lanes[l]->in);
      if (Inclusive) acc = Op::apply(acc, v);
      store_bytes(lanes[l]->out, acc);
      if (!Inclusive) acc = Op::apply(acc, v);
    }
  }
}

enum ShuffleKind { SHUFFLE, SHUFFLE_DOWN, SHUFFLE_UP, SHUFFLE_XOR, ROTATE_DOWN, ROTATE_UP,
                   FILL_DOWN, FILL_UP, BROADCAST_FIRST };

template <class T, int Kind, int W>
void resolve_shuffle(Fiber** lanes) {
  int first = -1;
  for (int l = 0; l < kSimdWidth && first < 0; ++l)
    if (lanes[l]) first = l;
  for (int l = 0; l < kSimdWidth; ++l) {
    Fiber* f = lanes[l];
    if (!f) continue;
    int base = l - l % W;
    int i = l - base;
    int64_t a = f->arg;
    int64_t src = -1;
    bool fill = false;
    switch (Kind) {
      case SHUFFLE: src = (a >= 0 && a < W) ? a : -1; break;
      case SHUFFLE_DOWN: src = i + a < W ? i + a : i; break;
      case SHUFFLE_UP: src = i - a >= 0 ? i - a : i; break;
      case SHUFFLE_XOR: src = (i ^ a) < W ? (i ^ a) : -1; break;
      case ROTATE_DOWN: src = (i + a) % W; break;
      case ROTATE_UP: src = ((i - a) % W + W) % W; break;
      case FILL_DOWN: src = i + a < W ? i + a : (fill = true, i + a - W); break;
      case FILL_UP: src = i - a >= 0 ? i - a : (fill = true, i - a + W); break;
      case BROADCAST_FIRST: src = first - base; break;
    }
    Fiber* from = (src >= 0 && src < W) ? lanes[base + src] : nullptr;
    T v = from ? load_bytes<T>(fill ? from->in2 : from->in) : poison<T>();
    store_bytes(f->out, v);
  }
}

// The lanes voting true, and the lanes taking part.
struct Ballot {
  uint64_t bits;
  uint64_t active;
};

inline void resolve_ballot(Fiber** lanes) {
  Ballot b{0, 0};
  for (int l = 0; l < kSimdWidth; ++l) {
    if (!lanes[l]) continue;
    b.active |= uint64_t(1) << l;
    if (load_bytes<bool>(lanes[l]->in2)) b.bits |= uint64_t(1) << l;
  }
  for (int l = 0; l < kSimdWidth; ++l)
    if (lanes[l]) store_bytes(lanes[l]->out, b);
}

inline void resolve_is_first(Fiber** lanes) {
  bool first = true;
  for (int l = 0; l < kSimdWidth; ++l)
    if (lanes[l]) {
      store_bytes(lanes[l]->out, first);
      first = false;
    }
}

// simdgroup_barrier: with mem_flags::mem_threadgroup it orders threadgroup memory in its simdgroup.
inline void resolve_simd_barrier(Fiber** lanes) {
  for (int l = 0; l < kSimdWidth; ++l) {
    if (!lanes[l]) continue;
    if (lanes[l]->arg & int64_t(mem_flags::mem_threadgroup)) ++L.sg_epoch[lanes[l]->index / kSimdWidth];
    return;
  }
}

// ---------------------------------------------------------------------------------------------
// The scheduler of one threadgroup.

inline int lanes_text(char* out, size_t n, Fiber* fibers, int count, int state, const Site* site) {
  int len = 0;
  int shown = 0;
  for (int i = 0; i < count && len < int(n) - 16; ++i) {
    if (fibers[i].state != state || (site && !same_site(fibers[i].site, *site))) continue;
    if (shown++ == 8) {
      len += snprintf(out + len, n - len, ", ...");
      break;
    }
    len += snprintf(out + len, n - len, "%s%d", shown > 1 ? ", " : "", i);
  }
  return len;
}

inline bool resolve_simdgroups(Fiber* fibers, int n) {
  bool any = false;
  for (int g = 0; g < n; g += kSimdWidth) {
    Fiber* lanes[kSimdWidth] = {};
    Fiber* lead = nullptr;
    for (int l = 0; l < kSimdWidth && g + l < n; ++l) {
      Fiber* f = &fibers[g + l];
      if (f->state != AT_SIMD) continue;
      if (!lead) lead = f;
      if (!same_site(f->site, lead->site) || f->resolve != lead->resolve) {
        char a[200], b[200];
        lanes_text(a, sizeof a, fibers + g, n - g < kSimdWidth ? n - g : kSimdWidth, AT_SIMD,
                   &lead->site);
        lanes_text(b, sizeof b, fibers + g, n - g < kSimdWidth ? n - g : kSimdWidth, AT_SIMD,
                   &f->site);
        set_error("lanes of simdgroup %d of threadgroup (%u, %u, %u) meet at different simd "
                  "collectives: lanes [%s] at %s (%s:%u:%u), lanes [%s] at %s (%s:%u:%u)",
                  g / kSimdWidth, L.tg_pos.x, L.tg_pos.y, L.tg_pos.z, a, lead->site.what,
                  lead->site.file, lead->site.line, lead->site.column, b, f->site.what,
                  f->site.file, f->site.line, f->site.column);
        return false;
      }
      lanes[l] = f;
    }
    if (!lead) continue;
    lead->resolve(lanes);
    for (auto* f : lanes)
      if (f) f->state = READY;
    any = true;
  }
  return any;
}

inline bool release_barrier(Fiber* fibers, int n) {
  Fiber* lead = nullptr;
  int done = 0;
  for (int i = 0; i < n; ++i) {
    if (fibers[i].state == DONE) {
      ++done;
    } else if (!lead) {
      lead = &fibers[i];
    } else if (!same_site(fibers[i].site, lead->site)) {
      char a[200], b[200];
      lanes_text(a, sizeof a, fibers, n, AT_BARRIER, &lead->site);
      lanes_text(b, sizeof b, fibers, n, AT_BARRIER, &fibers[i].site);
      set_error("threads of threadgroup (%u, %u, %u) wait at different barriers: threads [%s] "
                "at %s:%u:%u, threads [%s] at %s:%u:%u (a barrier inside non-uniform control "
                "flow)",
                L.tg_pos.x, L.tg_pos.y, L.tg_pos.z, a, lead->site.file, lead->site.line,
                lead->site.column, b, fibers[i].site.file, fibers[i].site.line,
                fibers[i].site.column);
      return false;
    }
  }
  if (done > 0) {
    char a[200], b[200];
    lanes_text(a, sizeof a, fibers, n, DONE, nullptr);
    lanes_text(b, sizeof b, fibers, n, AT_BARRIER, nullptr);
    set_error("missed barrier in threadgroup (%u, %u, %u): threads [%s] finished without "
              "reaching the threadgroup_barrier at %s:%u:%u where threads [%s] wait (every "
              "thread of a threadgroup must reach every barrier)",
              L.tg_pos.x, L.tg_pos.y, L.tg_pos.z, a, lead->site.file, lead->site.line,
              lead->site.column, b);
    return false;
  }
  if (lead->arg & int64_t(mem_flags::mem_threadgroup)) ++L.tg_epoch;
  for (int i = 0; i < n; ++i) fibers[i].state = READY;
  return true;
}

// Threads run between synchronisation points in `order`: forward, reverse or shuffled per
// threadgroup, so a race on threadgroup or device memory changes the result between schedules.
inline bool run_threadgroup(Fiber* fibers, int n, const int* order) {
  for (int i = 0; i < n; ++i) start_fiber(&fibers[i], i);
  for (;;) {
    for (int k = 0; k < n; ++k) {
      Fiber* f = &fibers[order[k]];
      if (f->state != READY) continue;
      run_fiber(f);
      if (L.failed) return false;
    }
    // Every thread now waits at a barrier or a collective, or has finished.
    bool waiting_at_barrier = false;
    bool waiting_at_simd = false;
    for (int i = 0; i < n; ++i) {
      waiting_at_barrier |= fibers[i].state == AT_BARRIER;
      waiting_at_simd |= fibers[i].state == AT_SIMD;
    }
    if (waiting_at_simd) {
      if (!resolve_simdgroups(fibers, n)) return false;
    } else if (waiting_at_barrier) {
      if (!release_barrier(fibers, n)) return false;
    } else {
      return true;
    }
  }
}

inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline void free_threadgroup_memory() {
  for (auto& s : L.tg_sites) {
    if (s.ptr) ::operator delete(s.ptr, std::align_val_t(64));
    s = ThreadgroupSite{};
  }
  L.tg_memory = 0;
}

// Faults inside kernel code (a raw pointer out of range, a fiber stack overflow, an integer
// division by zero) and a time limit end the launch with an error instead of the process.
inline double time_limit = 0;
inline pthread_t launch_thread;

inline void forward_signal(int sig, siginfo_t* info, void* context);

inline void on_fault(int sig, siginfo_t* info, void* context) {
  // Signals of other threads (MLX's workers, a fault outside the kernel) are not ours.
  if (!pthread_equal(pthread_self(), launch_thread)) {
    forward_signal(sig, info, context);
    return;
  }
  char who[256] = "the scheduler";
  if (cur) describe_thread(who, sizeof who, cur);
  const char* addr = static_cast<const char*>(info->si_addr);
  bool in_stacks = stack_pool && addr >= stack_pool && addr < stack_pool + kStackSize * kMaxThreads;
  if (sig == SIGALRM) {
    set_error("kernel still running after %.1f s (an infinite loop, or a launch too large for "
              "the emulator; the limit is MLX_LOCALNORM_EMULATE_TIMEOUT); last thread: %s",
              time_limit, who);
  } else if (sig == SIGFPE) {
    set_error("arithmetic fault (integer division or remainder by zero) by %s", who);
  } else if (in_stacks && (addr - stack_pool) % kStackSize < 4096) {
    set_error("thread stack overflow (over %zu KiB of thread-local data or recursion) by %s",
              kStackSize / 1024, who);
  } else {
    set_error("invalid memory access at address %p by %s: not through a kernel buffer (those "
              "are bounds-checked), so a thread-local array indexed out of range or a pointer "
              "converted to a raw `constant`/`thread` pointer",
              info->si_addr, who);
  }
  siglongjmp(fault_jump, 1);
}

struct FaultGuard {
  static constexpr int kSignals[4] = {SIGSEGV, SIGBUS, SIGFPE, SIGALRM};
  struct sigaction saved[4];
  stack_t saved_stack;
  itimerval saved_timer;
  alignas(16) char alt_stack[64 * 1024];

  void install() {
    stack_t ss{};
    ss.ss_sp = alt_stack;
    ss.ss_size = sizeof alt_stack;
    sigaltstack(&ss, &saved_stack);
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < 4; ++i) sigaction(kSignals[i], &sa, &saved[i]);
    itimerval timer{};
    timer.it_value.tv_sec = time_t(time_limit);
    timer.it_value.tv_usec = suseconds_t((time_limit - double(time_t(time_limit))) * 1e6);
    setitimer(ITIMER_REAL, &timer, &saved_timer);
  }
  void remove() {
    itimerval off{};
    setitimer(ITIMER_REAL, &off, nullptr);
    for (int i = 0; i < 4; ++i) sigaction(kSignals[i], &saved[i], nullptr);
    sigaltstack(&saved_stack, nullptr);
    if (saved_timer.it_value.tv_sec || saved_timer.it_value.tv_usec)
      setitimer(ITIMER_REAL, &saved_timer, nullptr);
  }
};
inline FaultGuard fault_guard;

inline void forward_signal(int sig, siginfo_t* info, void* context) {
  if (sig == SIGALRM) {
    pthread_kill(launch_thread, SIGALRM);
    return;
  }
  for (int i = 0; i < 4; ++i) {
    if (FaultGuard::kSignals[i] != sig) continue;
    const struct sigaction& previous = fault_guard.saved[i];
    if ((previous.sa_flags & SA_SIGINFO) && previous.sa_sigaction) {
      previous.sa_sigaction(sig, info, context);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
      previous.sa_handler(sig);
    } else {
      signal(sig, SIG_DFL);  // the faulting instruction runs again and takes the default action
    }
  }
}

// Order of the threads of a threadgroup between synchronisation points.
enum Order : int { ORDER_FORWARD = 0, ORDER_REVERSE = 1, ORDER_SHUFFLE = 2, ORDER_MIXED = 3 };

inline int launch(void (*thread_main)(Fiber*), Buffer* bufs, const int64_t* grid,
                  const int64_t* group, uint64_t seed, int order_mode, double timeout, char* err,
                  int64_t errlen) {
  L.bufs = bufs;
  L.grid = uint3(grid[0], grid[1], grid[2]);
  L.group = uint3(group[0], group[1], group[2]);
  L.thread_main = thread_main;
  L.err = err;
  L.errlen = errlen;
  L.failed = false;
  free_threadgroup_memory();
  if (!stack_top(0)) {
    set_error("could not map %zu bytes for fiber stacks", kStackSize * kMaxThreads);
    return 1;
  }
  uint3 tpg = (L.grid + L.group - 1u) / L.group;
  L.tgs_per_grid = tpg;
  L.dispatch_threads = L.group.x * L.group.y * L.group.z;
  uint64_t count = uint64_t(tpg.x) * tpg.y * tpg.z;
  uint64_t* order = new uint64_t[count];
  for (uint64_t i = 0; i < count; ++i) order[i] = i;
  uint64_t rng = seed;
  for (uint64_t i = count; i > 1; --i) {
    uint64_t j = splitmix64(rng) % i;
    uint64_t t = order[i - 1];
    order[i - 1] = order[j];
    order[j] = t;
  }
  Fiber* fibers = new Fiber[L.dispatch_threads];
  int* thread_order = new int[L.dispatch_threads];
  time_limit = timeout;
  launch_thread = pthread_self();
  fault_guard.install();
  volatile bool ok = true;
  if (sigsetjmp(fault_jump, 1)) {
    ok = false;
    cur = nullptr;
  }
  for (uint64_t k = 0; k < count && ok; ++k) {
    uint64_t t = order[k];
    L.tg_pos = uint3(t % tpg.x, (t / tpg.x) % tpg.y, t / (uint64_t(tpg.x) * tpg.y));
    uint3 start = L.tg_pos * L.group;
    // dispatchThreads: the threadgroups at the far edge of the grid are partial.
    L.tg_size = metal::min(L.group, L.grid - start);
    L.tg_threads = L.tg_size.x * L.tg_size.y * L.tg_size.z;
    for (auto& s : L.tg_sites)
      if (s.ptr) memset(s.ptr, 0xff, size_t(s.alloc));
    for (uint i = 0; i < L.tg_threads; ++i) {
      Fiber& f = fibers[i];
      f.index = i;
      f.pos = uint3(i % L.tg_size.x, (i / L.tg_size.x) % L.tg_size.y,
                    i / (L.tg_size.x * L.tg_size.y));
      f.gpos = start + f.pos;
    }
    int n = int(L.tg_threads);
    L.tg_epoch = 0;
    memset(L.sg_epoch, 0, sizeof L.sg_epoch);
    uint64_t mode = order_mode == ORDER_MIXED ? splitmix64(rng) % 3 : uint64_t(order_mode);
    for (int i = 0; i < n; ++i) thread_order[i] = mode == ORDER_REVERSE ? n - 1 - i : i;
    if (mode == ORDER_SHUFFLE) {
      for (int i = n - 1; i > 0; --i) {
        int j = int(splitmix64(rng) % uint64_t(i + 1));
        int t = thread_order[i];
        thread_order[i] = thread_order[j];
        thread_order[j] = t;
      }
    }
    ok = run_threadgroup(fibers, n, thread_order);
  }
  fault_guard.remove();
  delete[] thread_order;
  delete[] fibers;
  delete[] order;
  free_threadgroup_memory();
  return ok ? 0 : 1;
}

}  // namespace mlxe

extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_out_of_bounds(
    mlxe::UbsanOutOfBounds* data, void* index) {
  mlxe::array_out_of_bounds(data, index);
}
extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_out_of_bounds_abort(
    mlxe::UbsanOutOfBounds* data, void* index) {
  mlxe::array_out_of_bounds(data, index);
}
