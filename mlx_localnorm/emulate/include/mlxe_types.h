// Metal scalar and vector types, compiled as C++ for the CPU emulator.
// half is _Float16 (IEEE binary16); bfloat is a 16-bit struct that rounds to nearest even and
// computes in float, like MLX's CPU bfloat16.
#pragma once

#include <limits>
#include <stdint.h>
#include <type_traits>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;

namespace metal {

struct bfloat16_t {
  uint16_t bits;

  bfloat16_t() = default;
  static constexpr bfloat16_t from_bits(uint16_t b) {
    bfloat16_t r{};
    r.bits = b;
    return r;
  }
  constexpr bfloat16_t(float f) : bits(round_to_nearest_even(f)) {}
  constexpr bfloat16_t(double f) : bfloat16_t(float(f)) {}
  constexpr bfloat16_t(half f) : bfloat16_t(float(f)) {}
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  constexpr bfloat16_t(I i) : bfloat16_t(float(i)) {}
  constexpr operator float() const {
    return __builtin_bit_cast(float, uint32_t(bits) << 16);
  }

  static constexpr uint16_t round_to_nearest_even(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      return uint16_t((u >> 16) | 0x40u);  // NaN stays NaN (quiet)
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
};

}  // namespace metal

using metal::bfloat16_t;
typedef bfloat16_t bfloat;
typedef half float16_t;

namespace mlxe {

template <class T>
inline constexpr bool is_scalar_v = std::is_arithmetic_v<T> || std::is_same_v<T, half> ||
                                    std::is_same_v<T, bfloat16_t>;
// bfloat op x: float-like operands promote to float (or double), integers stay bfloat.
template <class U>
using bf_result_t = std::conditional_t<std::is_same_v<U, double>, double,
                    std::conditional_t<std::is_integral_v<U> || std::is_same_v<U, bfloat16_t>,
                                       bfloat16_t, float>>;

}  // namespace mlxe

namespace metal {

#define MLXE_BF_ARITH(op)                                                                    \
  template <class U, std::enable_if_t<mlxe::is_scalar_v<U>, int> = 0>                         \
  constexpr mlxe::bf_result_t<U> operator op(bfloat16_t a, U b) {                             \
    using R = mlxe::bf_result_t<U>;                                                           \
    using C = std::conditional_t<std::is_same_v<R, double>, double, float>;                  \
    return R(C(a) op C(b));                                                                   \
  }                                                                                           \
  template <class U, std::enable_if_t<mlxe::is_scalar_v<U> &&                                \
                                          !std::is_same_v<U, bfloat16_t>, int> = 0>          \
  constexpr mlxe::bf_result_t<U> operator op(U a, bfloat16_t b) {                             \
    using R = mlxe::bf_result_t<U>;                                                           \
    using C = std::conditional_t<std::is_same_v<R, double>, double, float>;                  \
    return R(C(a) op C(b));                                                                   \
  }                                                                                           \
  template <class U, std::enable_if_t<mlxe::is_scalar_v<U>, int> = 0>                         \
  constexpr bfloat16_t& operator op##=(bfloat16_t & a, U b) {                                 \
    a = bfloat16_t(float(a) op float(b));                                                     \
    return a;                                                                                 \
  }
MLXE_BF_ARITH(+)
MLXE_BF_ARITH(-)
MLXE_BF_ARITH(*)
MLXE_BF_ARITH(/)
#undef MLXE_BF_ARITH

#define MLXE_BF_CMP(op)                                                                      \
  template <class U, std::enable_if_t<mlxe::is_scalar_v<U>, int> = 0>                         \
  constexpr bool operator op(bfloat16_t a, U b) {                                             \
    return float(a) op float(b);                                                              \
  }                                                                                           \
  template <class U, std::enable_if_t<mlxe::is_scalar_v<U> &&                                \
                                          !std::is_same_v<U, bfloat16_t>, int> = 0>          \
  constexpr bool operator op(U a, bfloat16_t b) {                                             \
    return float(a) op float(b);                                                              \
  }
MLXE_BF_CMP(==)
MLXE_BF_CMP(!=)
MLXE_BF_CMP(<)
MLXE_BF_CMP(>)
MLXE_BF_CMP(<=)
MLXE_BF_CMP(>=)
#undef MLXE_BF_CMP

constexpr bfloat16_t operator-(bfloat16_t a) {
  return bfloat16_t::from_bits(a.bits ^ 0x8000u);
}
constexpr bfloat16_t operator+(bfloat16_t a) {
  return a;
}
inline bfloat16_t& operator++(bfloat16_t& a) {
  return a += 1;
}
inline bfloat16_t& operator--(bfloat16_t& a) {
  return a -= 1;
}

// ---------------------------------------------------------------------------------------------
// Vectors: x/y/z/w and r/g/b/a members, [i] indexing, elementwise arithmetic, explicit
// conversions. A 3-vector is padded to the size of a 4-vector, as in Metal.

template <class T, int N>
struct vec_storage;
template <class T>
struct alignas(2 * sizeof(T)) vec_storage<T, 2> {
  union {
    struct { T x, y; };
    struct { T r, g; };
    T e[2];
  };
};
template <class T>
struct alignas(4 * sizeof(T)) vec_storage<T, 3> {
  union {
    struct { T x, y, z; };
    struct { T r, g, b; };
    T e[4];
  };
};
template <class T>
struct alignas(4 * sizeof(T)) vec_storage<T, 4> {
  union {
    struct { T x, y, z, w; };
    struct { T r, g, b, a; };
    T e[4];
  };
};

template <class T, int N>
struct vec : vec_storage<T, N> {
  using value_type = T;
  static constexpr int size = N;

  // Trivial, as in Metal: an uninitialised vector holds the compiler's poison pattern, while
  // `float4()` and `float4 v = {}` are zero.
  vec() = default;
  template <class S, std::enable_if_t<mlxe::is_scalar_v<S>, int> = 0>
  vec(S s) {
    for (int i = 0; i < N; ++i) this->e[i] = T(s);
  }
  template <class A, class B, std::enable_if_t<N == 2 && mlxe::is_scalar_v<A>, int> = 0>
  vec(A a, B b) {
    this->e[0] = T(a);
    this->e[1] = T(b);
  }
  template <class A, class B, class C, std::enable_if_t<N == 3 && mlxe::is_scalar_v<A>, int> = 0>
  vec(A a, B b, C c) {
    this->e[0] = T(a);
    this->e[1] = T(b);
    this->e[2] = T(c);
  }
  template <class A, class B, class C, class D, std::enable_if_t<N == 4 && sizeof(A) != 0, int> = 0>
  vec(A a, B b, C c, D d) {
    this->e[0] = T(a);
    this->e[1] = T(b);
    this->e[2] = T(c);
    this->e[3] = T(d);
  }
  // Concatenations: float4(float2, float2), float4(float3, w), float3(float2, z), ...
  template <class U, int M, class S, std::enable_if_t<M + 1 == N && mlxe::is_scalar_v<S>, int> = 0>
  vec(vec<U, M> head, S tail) {
    for (int i = 0; i < M; ++i) this->e[i] = T(head.e[i]);
    this->e[M] = T(tail);
  }
  template <class S, class U, int M, std::enable_if_t<M + 1 == N && mlxe::is_scalar_v<S>, int> = 0>
  vec(S head, vec<U, M> tail) {
    this->e[0] = T(head);
    for (int i = 0; i < M; ++i) this->e[i + 1] = T(tail.e[i]);
  }
  template <class U, std::enable_if_t<N == 4 && sizeof(U) != 0, int> = 0>
  vec(vec<U, 2> lo, vec<U, 2> hi) {
    this->e[0] = T(lo.e[0]);
    this->e[1] = T(lo.e[1]);
    this->e[2] = T(hi.e[0]);
    this->e[3] = T(hi.e[1]);
  }
  template <class U, std::enable_if_t<!std::is_same_v<U, T>, int> = 0>
  explicit vec(vec<U, N> o) {
    for (int i = 0; i < N; ++i) this->e[i] = T(o.e[i]);
  }

  T& operator[](int i) { return this->e[i]; }
  const T& operator[](int i) const { return this->e[i]; }

  // `v.xy`, `v.zyx`, ... are rewritten to v.swizzle<0, 1>() etc. (read-only).
  template <int... I>
  vec<T, int(sizeof...(I))> swizzle() const {
    vec<T, int(sizeof...(I))> r;
    int k = 0;
    ((r.e[k++] = this->e[I]), ...);
    return r;
  }
};

#define MLXE_VEC_BINOP(op)                                                                   \
  template <class T, int N>                                                                   \
  vec<T, N> operator op(vec<T, N> a, vec<T, N> b) {                                           \
    vec<T, N> r;                                                                              \
    for (int i = 0; i < N; ++i) r.e[i] = T(a.e[i] op b.e[i]);                                 \
    return r;                                                                                 \
  }                                                                                           \
  template <class T, int N, class S, std::enable_if_t<mlxe::is_scalar_v<S>, int> = 0>         \
  vec<T, N> operator op(vec<T, N> a, S b) {                                                   \
    return a op vec<T, N>(b);                                                                 \
  }                                                                                           \
  template <class T, int N, class S, std::enable_if_t<mlxe::is_scalar_v<S>, int> = 0>         \
  vec<T, N> operator op(S a, vec<T, N> b) {                                                   \
    return vec<T, N>(a) op b;                                                                 \
  }                                                                                           \
  template <class T, int N, class S>                                                          \
  vec<T, N>& operator op##=(vec<T, N> & a, S b) {                                             \
    a = a op b;                                                                               \
    return a;                                                                                 \
  }
MLXE_VEC_BINOP(+)
MLXE_VEC_BINOP(-)
MLXE_VEC_BINOP(*)
MLXE_VEC_BINOP(/)
MLXE_VEC_BINOP(%)
MLXE_VEC_BINOP(&)
MLXE_VEC_BINOP(|)
MLXE_VEC_BINOP(^)
MLXE_VEC_BINOP(<<)
MLXE_VEC_BINOP(>>)
#undef MLXE_VEC_BINOP

#define MLXE_VEC_CMP(op)                                                                     \
  template <class T, int N>                                                                   \
  vec<bool, N> operator op(vec<T, N> a, vec<T, N> b) {                                        \
    vec<bool, N> r;                                                                           \
    for (int i = 0; i < N; ++i) r.e[i] = a.e[i] op b.e[i];                                    \
    return r;                                                                                 \
  }                                                                                           \
  template <class T, int N, class S, std::enable_if_t<mlxe::is_scalar_v<S>, int> = 0>         \
  vec<bool, N> operator op(vec<T, N> a, S b) {                                                \
    return a op vec<T, N>(b);                                                                 \
  }                                                                                           \
  template <class T, int N, class S, std::enable_if_t<mlxe::is_scalar_v<S>, int> = 0>         \
  vec<bool, N> operator op(S a, vec<T, N> b) {                                                \
    return vec<T, N>(a) op b;                                                                 \
  }
MLXE_VEC_CMP(==)
MLXE_VEC_CMP(!=)
MLXE_VEC_CMP(<)
MLXE_VEC_CMP(>)
MLXE_VEC_CMP(<=)
MLXE_VEC_CMP(>=)
MLXE_VEC_CMP(&&)
MLXE_VEC_CMP(||)
#undef MLXE_VEC_CMP

template <class T, int N>
vec<T, N> operator-(vec<T, N> a) {
  for (int i = 0; i < N; ++i) a.e[i] = -a.e[i];
  return a;
}
template <class T, int N>
vec<T, N> operator+(vec<T, N> a) {
  return a;
}
template <class T, int N>
vec<T, N> operator~(vec<T, N> a) {
  for (int i = 0; i < N; ++i) a.e[i] = ~a.e[i];
  return a;
}
template <class T, int N>
vec<bool, N> operator!(vec<T, N> a) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r.e[i] = !a.e[i];
  return r;
}

template <int N>
bool all(vec<bool, N> v) {
  for (int i = 0; i < N; ++i)
    if (!v.e[i]) return false;
  return true;
}
template <int N>
bool any(vec<bool, N> v) {
  for (int i = 0; i < N; ++i)
    if (v.e[i]) return true;
  return false;
}
inline bool all(bool b) {
  return b;
}
inline bool any(bool b) {
  return b;
}

#define MLXE_VEC_ALIASES(T, name) \
  typedef vec<T, 2> name##2;      \
  typedef vec<T, 3> name##3;      \
  typedef vec<T, 4> name##4;
MLXE_VEC_ALIASES(float, float)
MLXE_VEC_ALIASES(half, half)
MLXE_VEC_ALIASES(bfloat16_t, bfloat)
MLXE_VEC_ALIASES(int, int)
MLXE_VEC_ALIASES(uint, uint)
MLXE_VEC_ALIASES(short, short)
MLXE_VEC_ALIASES(ushort, ushort)
MLXE_VEC_ALIASES(char, char)
MLXE_VEC_ALIASES(uchar, uchar)
MLXE_VEC_ALIASES(long, long)
MLXE_VEC_ALIASES(ulong, ulong)
MLXE_VEC_ALIASES(bool, bool)
#undef MLXE_VEC_ALIASES

template <class To, class From>
To as_type(From v) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of the same size");
  return __builtin_bit_cast(To, v);
}

// ---------------------------------------------------------------------------------------------
// numeric_limits, with half and bfloat.

template <class T>
struct numeric_limits : std::numeric_limits<T> {};

template <>
struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr bool has_infinity = true;
  static constexpr bool has_quiet_NaN = true;
  static constexpr int digits = 11;
  static constexpr half max() { return half(65504.0f); }
  static constexpr half min() { return half(6.103515625e-05f); }
  static constexpr half lowest() { return half(-65504.0f); }
  static constexpr half epsilon() { return half(0.0009765625f); }
  static constexpr half infinity() { return __builtin_bit_cast(half, uint16_t(0x7c00)); }
  static constexpr half quiet_NaN() { return __builtin_bit_cast(half, uint16_t(0x7e00)); }
  static constexpr half denorm_min() { return __builtin_bit_cast(half, uint16_t(0x0001)); }
};

template <>
struct numeric_limits<bfloat16_t> {
  static constexpr bool is_specialized = true;
  static constexpr bool has_infinity = true;
  static constexpr bool has_quiet_NaN = true;
  static constexpr int digits = 8;
  static constexpr bfloat16_t max() { return bfloat16_t::from_bits(0x7f7f); }
  static constexpr bfloat16_t min() { return bfloat16_t::from_bits(0x0080); }
  static constexpr bfloat16_t lowest() { return bfloat16_t::from_bits(0xff7f); }
  static constexpr bfloat16_t epsilon() { return bfloat16_t::from_bits(0x3c00); }
  static constexpr bfloat16_t infinity() { return bfloat16_t::from_bits(0x7f80); }
  static constexpr bfloat16_t quiet_NaN() { return bfloat16_t::from_bits(0x7fc0); }
  static constexpr bfloat16_t denorm_min() { return bfloat16_t::from_bits(0x0001); }
};

}  // namespace metal
