// What a kernel body sees: Metal's simdgroup, barrier and atomic functions, MLX's kernel utils
// (the text `mx.fast.metal_kernel` prepends), and the address-space keywords as no-ops.
#pragma once

// macOS hides the (deprecated) ucontext functions unless _XOPEN_SOURCE is set before any header.
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700
#define _DARWIN_C_SOURCE
#endif

#include "mlxe_runtime.h"

namespace metal {

using mlxe::mem_flags;

#define MLXE_LOC std::source_location loc = std::source_location::current()

// The flags are required, as in Metal; only mem_flags::mem_threadgroup orders threadgroup memory.
inline void threadgroup_barrier(mem_flags flags, MLXE_LOC) {
  mlxe::barrier(flags, loc);
}
inline void simdgroup_barrier(mem_flags flags, MLXE_LOC) {
  mlxe::collective<char>(0, &mlxe::resolve_simd_barrier, int64_t(flags), "simdgroup_barrier", loc);
}
template <class Missing = void>
void threadgroup_barrier(MLXE_LOC) {
  static_assert(sizeof(Missing*) == 0, "threadgroup_barrier needs its mem_flags argument in "
                "Metal, e.g. threadgroup_barrier(mem_flags::mem_threadgroup)");
}
template <class Missing = void>
void simdgroup_barrier(MLXE_LOC) {
  static_assert(sizeof(Missing*) == 0, "simdgroup_barrier needs its mem_flags argument in "
                "Metal, e.g. simdgroup_barrier(mem_flags::mem_threadgroup)");
}

#define MLXE_REDUCE(name, Op, W)                                                          \
  template <class T>                                                                      \
  mlxe::value_t<T> name(const T& v, MLXE_LOC) {                                           \
    using V = mlxe::value_t<T>;                                                           \
    return mlxe::collective<V>(V(v), &mlxe::resolve_reduce<V, mlxe::Op, W>, 0, #name, loc); \
  }
MLXE_REDUCE(simd_sum, OpSum, 32)
MLXE_REDUCE(simd_product, OpProduct, 32)
MLXE_REDUCE(simd_max, OpMax, 32)
MLXE_REDUCE(simd_min, OpMin, 32)
MLXE_REDUCE(simd_and, OpAnd, 32)
MLXE_REDUCE(simd_or, OpOr, 32)
MLXE_REDUCE(simd_xor, OpXor, 32)
MLXE_REDUCE(quad_sum, OpSum, 4)
MLXE_REDUCE(quad_product, OpProduct, 4)
MLXE_REDUCE(quad_max, OpMax, 4)
MLXE_REDUCE(quad_min, OpMin, 4)
MLXE_REDUCE(quad_and, OpAnd, 4)
MLXE_REDUCE(quad_or, OpOr, 4)
MLXE_REDUCE(quad_xor, OpXor, 4)
#undef MLXE_REDUCE

#define MLXE_PREFIX(name, Op, inclusive, W)                                                   \
  template <class T>                                                                          \
  mlxe::value_t<T> name(const T& v, MLXE_LOC) {                                               \
    using V = mlxe::value_t<T>;                                                               \
    return mlxe::collective<V>(V(v), &mlxe::resolve_prefix<V, mlxe::Op, inclusive, W>, 0, #name, \
                               loc);                                                          \
  }
MLXE_PREFIX(simd_prefix_inclusive_sum, OpSum, true, 32)
MLXE_PREFIX(simd_prefix_exclusive_sum, OpSum, false, 32)
MLXE_PREFIX(simd_prefix_inclusive_product, OpProduct, true, 32)
MLXE_PREFIX(simd_prefix_exclusive_product, OpProduct, false, 32)
MLXE_PREFIX(quad_prefix_inclusive_sum, OpSum, true, 4)
MLXE_PREFIX(quad_prefix_exclusive_sum, OpSum, false, 4)
MLXE_PREFIX(quad_prefix_inclusive_product, OpProduct, true, 4)
MLXE_PREFIX(quad_prefix_exclusive_product, OpProduct, false, 4)
#undef MLXE_PREFIX

#define MLXE_SHUFFLE(name, kind, W)                                                           \
  template <class T, class I>                                                                 \
  mlxe::value_t<T> name(const T& v, I arg, MLXE_LOC) {                                        \
    using V = mlxe::value_t<T>;                                                               \
    return mlxe::collective<V>(V(v), &mlxe::resolve_shuffle<V, mlxe::kind, W>, int64_t(arg), \
                               #name, loc);                                                   \
  }
MLXE_SHUFFLE(simd_shuffle, SHUFFLE, 32)
MLXE_SHUFFLE(simd_broadcast, SHUFFLE, 32)
MLXE_SHUFFLE(simd_shuffle_down, SHUFFLE_DOWN, 32)
MLXE_SHUFFLE(simd_shuffle_up, SHUFFLE_UP, 32)
MLXE_SHUFFLE(simd_shuffle_xor, SHUFFLE_XOR, 32)
MLXE_SHUFFLE(simd_shuffle_rotate_down, ROTATE_DOWN, 32)
MLXE_SHUFFLE(simd_shuffle_rotate_up, ROTATE_UP, 32)
MLXE_SHUFFLE(quad_shuffle, SHUFFLE, 4)
MLXE_SHUFFLE(quad_broadcast, SHUFFLE, 4)
MLXE_SHUFFLE(quad_shuffle_down, SHUFFLE_DOWN, 4)
MLXE_SHUFFLE(quad_shuffle_up, SHUFFLE_UP, 4)
MLXE_SHUFFLE(quad_shuffle_xor, SHUFFLE_XOR, 4)
MLXE_SHUFFLE(quad_shuffle_rotate_down, ROTATE_DOWN, 4)
MLXE_SHUFFLE(quad_shuffle_rotate_up, ROTATE_UP, 4)
#undef MLXE_SHUFFLE

#define MLXE_FILL(name, kind)                                                                \
  template <class T, class F, class I>                                                       \
  mlxe::value_t<T> name(const T& data, const F& filling, I delta, MLXE_LOC) {                \
    using V = mlxe::value_t<T>;                                                              \
    return mlxe::collective<V, V>(V(data), &mlxe::resolve_shuffle<V, mlxe::kind, 32>,       \
                                  int64_t(delta), #name, loc, V(filling));                   \
  }
MLXE_FILL(simd_shuffle_and_fill_down, FILL_DOWN)
MLXE_FILL(simd_shuffle_and_fill_up, FILL_UP)
#undef MLXE_FILL

template <class T>
mlxe::value_t<T> simd_broadcast_first(const T& v, MLXE_LOC) {
  using V = mlxe::value_t<T>;
  return mlxe::collective<V>(V(v), &mlxe::resolve_shuffle<V, mlxe::BROADCAST_FIRST, 32>, 0,
                             "simd_broadcast_first", loc);
}

struct simd_vote {
  using vote_t = uint64_t;
  vote_t bits;
  vote_t active;  // the lanes that voted: all() asks whether every one of them voted true
  explicit operator vote_t() const { return bits; }
  bool all() const { return bits == active; }
  bool any() const { return bits != 0; }
};

inline simd_vote simd_ballot(bool b, MLXE_LOC) {
  auto v = mlxe::collective<mlxe::Ballot, bool>({}, &mlxe::resolve_ballot, 0, "simd_ballot", loc, b);
  return simd_vote{v.bits, v.active};
}
inline simd_vote simd_active_threads_mask(MLXE_LOC) {
  auto v = mlxe::collective<mlxe::Ballot, bool>({}, &mlxe::resolve_ballot, 0,
                                                "simd_active_threads_mask", loc, true);
  return simd_vote{v.bits, v.active};
}
inline bool simd_all(bool b, MLXE_LOC) {
  return mlxe::collective<bool>(b, &mlxe::resolve_reduce<bool, mlxe::OpAnd, 32>, 0, "simd_all",
                                loc);
}
inline bool simd_any(bool b, MLXE_LOC) {
  return mlxe::collective<bool>(b, &mlxe::resolve_reduce<bool, mlxe::OpOr, 32>, 0, "simd_any",
                                loc);
}
inline bool simd_is_first(MLXE_LOC) {
  return mlxe::collective<bool>(false, &mlxe::resolve_is_first, 0, "simd_is_first", loc);
}

// Atomics: fibers never preempt each other, so a plain read-modify-write is atomic.
template <class T>
struct atomic {
  T v;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
typedef atomic<ulong> atomic_ulong;

enum memory_order {
  memory_order_relaxed,
  memory_order_acquire,
  memory_order_release,
  memory_order_acq_rel,
  memory_order_seq_cst,
};

}  // namespace metal

namespace mlxe {
template <class T>
struct is_atomic<metal::atomic<T>> : std::true_type {};

template <class A>
A* atomic_target(A* p) {
  return p;
}
template <class A>
A* atomic_target(tg_ptr<A> t) {
  return &t[0];
}
template <class A, int Space>
A* atomic_target(device_ptr<A, Space> d) {
  if (d.b) {
    touch(d.b, d.p, false);
    touch(d.b, d.p, true);
  }
  return d.p;
}
}  // namespace mlxe

namespace metal {

template <class P, class V>
void atomic_store_explicit(P obj, V desired, memory_order = memory_order_relaxed) {
  auto* a = mlxe::atomic_target(obj);
  a->v = decltype(a->v)(desired);
}
template <class P>
auto atomic_load_explicit(P obj, memory_order = memory_order_relaxed) {
  return mlxe::atomic_target(obj)->v;
}
template <class P, class V>
auto atomic_exchange_explicit(P obj, V desired, memory_order = memory_order_relaxed) {
  auto* a = mlxe::atomic_target(obj);
  auto old = a->v;
  a->v = decltype(a->v)(desired);
  return old;
}
template <class P, class E, class V>
bool atomic_compare_exchange_weak_explicit(P obj, E* expected, V desired,
                                           memory_order = memory_order_relaxed,
                                           memory_order = memory_order_relaxed) {
  auto* a = mlxe::atomic_target(obj);
  if (a->v == *expected) {
    a->v = decltype(a->v)(desired);
    return true;
  }
  *expected = a->v;
  return false;
}
template <class P, class E, class V>
bool atomic_compare_exchange_strong_explicit(P obj, E* expected, V desired,
                                             memory_order s = memory_order_relaxed,
                                             memory_order f = memory_order_relaxed) {
  return atomic_compare_exchange_weak_explicit(obj, expected, desired, s, f);
}

#define MLXE_ATOMIC_RMW(name, expr)                                             \
  template <class P, class V>                                                   \
  auto name(P obj, V arg, memory_order = memory_order_relaxed) {                \
    auto* a = mlxe::atomic_target(obj);                                         \
    using T = decltype(a->v);                                                   \
    T old = a->v;                                                               \
    T b = T(arg);                                                               \
    a->v = T(expr);                                                             \
    return old;                                                                 \
  }
MLXE_ATOMIC_RMW(atomic_fetch_add_explicit, old + b)
MLXE_ATOMIC_RMW(atomic_fetch_sub_explicit, old - b)
MLXE_ATOMIC_RMW(atomic_fetch_and_explicit, old & b)
MLXE_ATOMIC_RMW(atomic_fetch_or_explicit, old | b)
MLXE_ATOMIC_RMW(atomic_fetch_xor_explicit, old ^ b)
MLXE_ATOMIC_RMW(atomic_fetch_min_explicit, b < old ? b : old)
MLXE_ATOMIC_RMW(atomic_fetch_max_explicit, old < b ? b : old)
#undef MLXE_ATOMIC_RMW

#undef MLXE_LOC

}  // namespace metal

using namespace metal;

// ---------------------------------------------------------------------------------------------
// MLX's Metal kernel utils (mlx/backend/metal/kernels/{utils,defines,bf16}.h), the parts custom
// kernels use.

#define METAL_FUNC inline __attribute__((always_inline))
#define MLX_MTL_PRAGMA_UNROLL

static constexpr int MAX_REDUCE_SPECIALIZED_DIMS = 4;
static constexpr int REDUCE_N_READS = 4;
static constexpr int REDUCE_N_WRITES = 4;
static constexpr int SOFTMAX_N_READS = 4;
static constexpr int RMS_N_READS = 4;
static constexpr int RMS_LOOPED_LIMIT = 4096;

inline uint16_t bfloat16_to_uint16(const bfloat16_t x) {
  return as_type<uint16_t>(x);
}
inline bfloat16_t uint16_to_bfloat16(const uint16_t x) {
  return as_type<bfloat16_t>(x);
}

template <typename U>
struct WorkPerThread {
  static_assert(sizeof(U) <= 8, "Type too large");
  static constexpr int n = 8 / sizeof(U);
};

template <typename U>
struct Limits {
  static constexpr U max = metal::numeric_limits<U>::max();
  static constexpr U min = metal::numeric_limits<U>::min();
  static constexpr U finite_max = metal::numeric_limits<U>::max();
  static constexpr U finite_min = metal::numeric_limits<U>::min();
};
#define MLXE_FLOAT_LIMIT(type)                                                    \
  template <>                                                                     \
  struct Limits<type> {                                                           \
    static constexpr type max = metal::numeric_limits<type>::infinity();          \
    static constexpr type min = -metal::numeric_limits<type>::infinity();         \
    static constexpr type finite_max = metal::numeric_limits<type>::max();        \
    static constexpr type finite_min = -metal::numeric_limits<type>::max();       \
  };
MLXE_FLOAT_LIMIT(half)
MLXE_FLOAT_LIMIT(float)
MLXE_FLOAT_LIMIT(bfloat16_t)
#undef MLXE_FLOAT_LIMIT
template <>
struct Limits<bool> {
  static constexpr bool max = true;
  static constexpr bool min = false;
};

// Shapes and strides come as `constant` pointers (the kernel's `<name>_shape`) or thread arrays.
template <typename IdxT = int64_t, class PS, class PT>
METAL_FUNC IdxT elem_to_loc(IdxT elem, PS shape, PT strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}

template <typename IdxT = int64_t, class PS, class PT>
METAL_FUNC IdxT elem_to_loc(uint3 elem, PS shape, PT strides, int ndim) {
  IdxT loc = elem.x * IdxT(strides[ndim - 1]) + elem.y * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}

template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc_1(uint elem, const int64_t& stride) {
  return elem * IdxT(stride);
}
template <typename IdxT = int64_t, class PT>
METAL_FUNC IdxT elem_to_loc_2(uint2 elem, PT strides) {
  return elem.x * IdxT(strides[1]) + elem.y * IdxT(strides[0]);
}
template <typename IdxT = int64_t, class PT>
METAL_FUNC IdxT elem_to_loc_3(uint3 elem, PT strides) {
  return elem.x * IdxT(strides[2]) + elem.y * IdxT(strides[1]) + elem.z * IdxT(strides[0]);
}

template <typename IdxT = int64_t, class PS, class PA, class PB>
METAL_FUNC vec<IdxT, 2> elem_to_loc_2_nd(uint3 elem, PS shape, PA a_strides, PB b_strides,
                                         int ndim) {
  vec<IdxT, 2> loc = {
      IdxT(elem.x * IdxT(a_strides[ndim - 1]) + IdxT(elem.y) * IdxT(a_strides[ndim - 2])),
      IdxT(elem.x * IdxT(b_strides[ndim - 1]) + elem.y * IdxT(b_strides[ndim - 2]))};
  for (int d = ndim - 3; d >= 0; --d) {
    uint l = elem.z % shape[d];
    loc.x += l * IdxT(a_strides[d]);
    loc.y += l * IdxT(b_strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}

template <typename T, typename U>
inline T ceildiv(T N, U M) {
  return (N + M - 1) / M;
}

template <bool condition, typename T, typename U>
struct ConditionalType {
  using type = U;
};
template <typename T, typename U>
struct ConditionalType<true, T, U> {
  using type = T;
};

template <typename U, typename T>
inline U cast_to(T val) {
  return static_cast<U>(val);
}

// Address-space qualifiers and `thread`-qualified member functions are no-ops on the CPU;
// `device T*` and `threadgroup T name[N];` were rewritten before compilation.
#define device
#define constant
#define thread
#define threadgroup
#define ray_data
#define object_data
