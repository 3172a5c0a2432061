// metal:: math on the CPU. half and bfloat compute in float and round once, like Metal's
// correctly rounded half functions; vectors apply the scalar function per lane.
// GCC builtins are used instead of <cmath> so that ::abs and friends do not clash with metal::.
#pragma once

#include "mlxe_types.h"

namespace metal {

#define MLXE_UNARY(name, fexpr, dexpr)                                       \
  inline float name(float x) { return fexpr; }                               \
  inline double name(double x) { return dexpr; }                             \
  inline half name(half x) { return half(name(float(x))); }                  \
  inline bfloat16_t name(bfloat16_t x) { return bfloat16_t(name(float(x))); } \
  template <class T, int N>                                                  \
  vec<T, N> name(vec<T, N> v) {                                              \
    for (int i = 0; i < N; ++i) v.e[i] = name(v.e[i]);                       \
    return v;                                                                \
  }

MLXE_UNARY(sqrt, __builtin_sqrtf(x), __builtin_sqrt(x))
MLXE_UNARY(rsqrt, 1.0f / __builtin_sqrtf(x), 1.0 / __builtin_sqrt(x))
MLXE_UNARY(exp, __builtin_expf(x), __builtin_exp(x))
MLXE_UNARY(exp2, __builtin_exp2f(x), __builtin_exp2(x))
MLXE_UNARY(exp10, __builtin_powf(10.0f, x), __builtin_pow(10.0, x))
MLXE_UNARY(log, __builtin_logf(x), __builtin_log(x))
MLXE_UNARY(log2, __builtin_log2f(x), __builtin_log2(x))
MLXE_UNARY(log10, __builtin_log10f(x), __builtin_log10(x))
MLXE_UNARY(sin, __builtin_sinf(x), __builtin_sin(x))
MLXE_UNARY(cos, __builtin_cosf(x), __builtin_cos(x))
MLXE_UNARY(tan, __builtin_tanf(x), __builtin_tan(x))
MLXE_UNARY(asin, __builtin_asinf(x), __builtin_asin(x))
MLXE_UNARY(acos, __builtin_acosf(x), __builtin_acos(x))
MLXE_UNARY(atan, __builtin_atanf(x), __builtin_atan(x))
MLXE_UNARY(sinh, __builtin_sinhf(x), __builtin_sinh(x))
MLXE_UNARY(cosh, __builtin_coshf(x), __builtin_cosh(x))
MLXE_UNARY(tanh, __builtin_tanhf(x), __builtin_tanh(x))
MLXE_UNARY(asinh, __builtin_asinhf(x), __builtin_asinh(x))
MLXE_UNARY(acosh, __builtin_acoshf(x), __builtin_acosh(x))
MLXE_UNARY(atanh, __builtin_atanhf(x), __builtin_atanh(x))
MLXE_UNARY(floor, __builtin_floorf(x), __builtin_floor(x))
MLXE_UNARY(ceil, __builtin_ceilf(x), __builtin_ceil(x))
MLXE_UNARY(trunc, __builtin_truncf(x), __builtin_trunc(x))
MLXE_UNARY(round, __builtin_roundf(x), __builtin_round(x))
MLXE_UNARY(rint, __builtin_rintf(x), __builtin_rint(x))
MLXE_UNARY(fabs, __builtin_fabsf(x), __builtin_fabs(x))
MLXE_UNARY(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f),
           __builtin_fmin(x - __builtin_floor(x), 0x1.fffffffffffffp-1))
MLXE_UNARY(sign, x > 0 ? 1.0f : (x < 0 ? -1.0f : (x == 0 ? 0.0f * x : x)),
           x > 0 ? 1.0 : (x < 0 ? -1.0 : (x == 0 ? 0.0 * x : x)))
MLXE_UNARY(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f),
           __builtin_fmin(__builtin_fmax(x, 0.0), 1.0))
#undef MLXE_UNARY

// Integer overloads come first: the vector templates below must see them.
#define MLXE_INT_MINMAX(T)                   \
  inline T max(T a, T b) { return a < b ? b : a; } \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T abs(T a) { return a < 0 ? T(-a) : a; }  \
  inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
MLXE_INT_MINMAX(char)
MLXE_INT_MINMAX(int8_t)
MLXE_INT_MINMAX(uchar)
MLXE_INT_MINMAX(short)
MLXE_INT_MINMAX(ushort)
MLXE_INT_MINMAX(int)
MLXE_INT_MINMAX(uint)
MLXE_INT_MINMAX(long)
MLXE_INT_MINMAX(ulong)
#undef MLXE_INT_MINMAX

#define MLXE_BINARY(name, fexpr, dexpr)                                                 \
  inline float name(float x, float y) { return fexpr; }                                 \
  inline double name(double x, double y) { return dexpr; }                              \
  inline half name(half x, half y) { return half(name(float(x), float(y))); }           \
  inline bfloat16_t name(bfloat16_t x, bfloat16_t y) {                                  \
    return bfloat16_t(name(float(x), float(y)));                                        \
  }                                                                                     \
  template <class T, int N>                                                             \
  vec<T, N> name(vec<T, N> a, vec<T, N> b) {                                            \
    for (int i = 0; i < N; ++i) a.e[i] = name(a.e[i], b.e[i]);                          \
    return a;                                                                           \
  }                                                                                     \
  template <class T, int N>                                                             \
  vec<T, N> name(vec<T, N> a, T b) {                                                    \
    for (int i = 0; i < N; ++i) a.e[i] = name(a.e[i], b);                               \
    return a;                                                                           \
  }

// Metal's max/min return the other operand when one is NaN (like fmax/fmin).
MLXE_BINARY(fmax, __builtin_fmaxf(x, y), __builtin_fmax(x, y))
MLXE_BINARY(fmin, __builtin_fminf(x, y), __builtin_fmin(x, y))
MLXE_BINARY(max, __builtin_fmaxf(x, y), __builtin_fmax(x, y))
MLXE_BINARY(min, __builtin_fminf(x, y), __builtin_fmin(x, y))
MLXE_BINARY(pow, __builtin_powf(x, y), __builtin_pow(x, y))
MLXE_BINARY(powr, __builtin_powf(x, y), __builtin_pow(x, y))
MLXE_BINARY(atan2, __builtin_atan2f(x, y), __builtin_atan2(x, y))
MLXE_BINARY(fmod, __builtin_fmodf(x, y), __builtin_fmod(x, y))
MLXE_BINARY(copysign, __builtin_copysignf(x, y), __builtin_copysign(x, y))
MLXE_BINARY(fdim, __builtin_fdimf(x, y), __builtin_fdim(x, y))
MLXE_BINARY(step, y < x ? 0.0f : 1.0f, y < x ? 0.0 : 1.0)
#undef MLXE_BINARY


inline float abs(float x) {
  return __builtin_fabsf(x);
}
inline double abs(double x) {
  return __builtin_fabs(x);
}
inline half abs(half x) {
  return half(__builtin_fabsf(float(x)));
}
inline bfloat16_t abs(bfloat16_t x) {
  return bfloat16_t::from_bits(x.bits & 0x7fffu);
}
template <class T, int N>
vec<T, N> abs(vec<T, N> v) {
  for (int i = 0; i < N; ++i) v.e[i] = abs(v.e[i]);
  return v;
}

#define MLXE_FLOAT_TERNARY(T)                                                         \
  inline T clamp(T x, T lo, T hi) { return fmin(fmax(x, lo), hi); }                   \
  inline T fma(T a, T b, T c) { return T(__builtin_fma(double(a), double(b), double(c))); } \
  inline T mix(T x, T y, T a) { return x + (y - x) * a; }                             \
  inline T smoothstep(T e0, T e1, T x) {                                              \
    T t = clamp(T((x - e0) / (e1 - e0)), T(0), T(1));                                 \
    return t * t * (T(3) - T(2) * t);                                                 \
  }
MLXE_FLOAT_TERNARY(half)
MLXE_FLOAT_TERNARY(bfloat16_t)
MLXE_FLOAT_TERNARY(double)
#undef MLXE_FLOAT_TERNARY
inline float clamp(float x, float lo, float hi) {
  return fmin(fmax(x, lo), hi);
}
inline float fma(float a, float b, float c) {
  return __builtin_fmaf(a, b, c);
}
inline float mix(float x, float y, float a) {
  return x + (y - x) * a;
}
inline float smoothstep(float e0, float e1, float x) {
  float t = clamp((x - e0) / (e1 - e0), 0.0f, 1.0f);
  return t * t * (3.0f - 2.0f * t);
}
template <class T, int N>
vec<T, N> clamp(vec<T, N> x, vec<T, N> lo, vec<T, N> hi) {
  for (int i = 0; i < N; ++i) x.e[i] = clamp(x.e[i], lo.e[i], hi.e[i]);
  return x;
}
template <class T, int N>
vec<T, N> clamp(vec<T, N> x, T lo, T hi) {
  for (int i = 0; i < N; ++i) x.e[i] = clamp(x.e[i], lo, hi);
  return x;
}
template <class T, int N>
vec<T, N> fma(vec<T, N> a, vec<T, N> b, vec<T, N> c) {
  for (int i = 0; i < N; ++i) a.e[i] = fma(a.e[i], b.e[i], c.e[i]);
  return a;
}
template <class T, int N>
vec<T, N> mix(vec<T, N> x, vec<T, N> y, vec<T, N> a) {
  for (int i = 0; i < N; ++i) x.e[i] = mix(x.e[i], y.e[i], a.e[i]);
  return x;
}
template <class T, int N>
vec<T, N> mix(vec<T, N> x, vec<T, N> y, T a) {
  for (int i = 0; i < N; ++i) x.e[i] = mix(x.e[i], y.e[i], a);
  return x;
}

template <class T>
T select(T a, T b, bool c) {
  return c ? b : a;
}
template <class T, int N>
vec<T, N> select(vec<T, N> a, vec<T, N> b, vec<bool, N> c) {
  for (int i = 0; i < N; ++i) a.e[i] = c.e[i] ? b.e[i] : a.e[i];
  return a;
}

template <class T>
T sincos(T x, T& c) {
  c = cos(x);
  return sin(x);
}

#define MLXE_PREDICATE(name, expr)                                          \
  inline bool name(float x) { return expr; }                                \
  inline bool name(double x) { return expr; }                               \
  inline bool name(half h) { float x = float(h); return expr; }             \
  inline bool name(bfloat16_t b) { float x = float(b); return expr; }       \
  template <class T, int N>                                                 \
  vec<bool, N> name(vec<T, N> v) {                                          \
    vec<bool, N> r;                                                         \
    for (int i = 0; i < N; ++i) r.e[i] = name(v.e[i]);                      \
    return r;                                                               \
  }
MLXE_PREDICATE(isnan, __builtin_isnan(x))
MLXE_PREDICATE(isinf, __builtin_isinf(x))
MLXE_PREDICATE(isfinite, __builtin_isfinite(x))
MLXE_PREDICATE(signbit, __builtin_signbit(x))
#undef MLXE_PREDICATE

template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
T popcount(T x) {
  return T(__builtin_popcountll((unsigned long long)(std::make_unsigned_t<T>)x));
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
T clz(T x) {
  using U = std::make_unsigned_t<T>;
  return x == 0 ? T(sizeof(T) * 8)
                : T(__builtin_clzll((unsigned long long)(U)x) - (64 - sizeof(T) * 8));
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
T ctz(T x) {
  return x == 0 ? T(sizeof(T) * 8) : T(__builtin_ctzll((unsigned long long)x));
}
template <class T, std::enable_if_t<std::is_integral_v<T> && sizeof(T) <= 4, int> = 0>
T mulhi(T a, T b) {
  return T((int64_t(a) * int64_t(b)) >> (sizeof(T) * 8));
}

template <class T, int N>
T dot(vec<T, N> a, vec<T, N> b) {
  T s = a.e[0] * b.e[0];
  for (int i = 1; i < N; ++i) s += a.e[i] * b.e[i];
  return s;
}
template <class T, int N>
T length(vec<T, N> a) {
  return sqrt(dot(a, a));
}
template <class T, int N>
vec<T, N> normalize(vec<T, N> a) {
  return a * rsqrt(dot(a, a));
}

template <class T>
T divide(T x, T y) {
  return x / y;
}

namespace precise {
using metal::acos, metal::acosh, metal::asin, metal::asinh, metal::atan, metal::atan2,
    metal::atanh, metal::cos, metal::cosh, metal::exp, metal::exp10, metal::exp2, metal::fma,
    metal::log, metal::log10, metal::log2, metal::pow, metal::powr, metal::rsqrt, metal::sin,
    metal::sinh, metal::sqrt, metal::tan, metal::tanh, metal::max, metal::min, metal::fmax,
    metal::fmin, metal::abs, metal::fabs, metal::clamp, metal::divide;
}  // namespace precise
namespace fast {
using namespace metal::precise;
}  // namespace fast

}  // namespace metal

// Metal's math constants (MSL specification, section 6.5), as the Metal headers define them.
#define MAXFLOAT __FLT_MAX__
#define HUGE_VALF __builtin_huge_valf()
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define FLT_MAX __FLT_MAX__
#define FLT_MIN __FLT_MIN__
#define FLT_EPSILON __FLT_EPSILON__
#define M_E_F 2.71828182845904523536028747135266250f
#define M_LOG2E_F 1.44269504088896340735992468100189214f
#define M_LOG10E_F 0.434294481903251827651128918916605082f
#define M_LN2_F 0.693147180559945309417232121458176568f
#define M_LN10_F 2.30258509299404568401799145468436421f
#define M_PI_F 3.14159265358979323846264338327950288f
#define M_PI_2_F 1.57079632679489661923132169163975144f
#define M_PI_4_F 0.785398163397448309615660845819875721f
#define M_1_PI_F 0.318309886183790671537767526745028724f
#define M_2_PI_F 0.636619772367581343075535053490057448f
#define M_2_SQRTPI_F 1.12837916709551257389615890312154517f
#define M_SQRT2_F 1.41421356237309504880168872420969808f
#define M_SQRT1_2_F 0.707106781186547524400844362104849039f
