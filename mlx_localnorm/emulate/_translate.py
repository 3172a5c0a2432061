"""Kernel text: MLX's generated Metal source, and its C++ translation for the emulator.

The Metal text follows `write_signature` in ml-explore/mlx
`mlx/backend/metal/custom_kernel.cpp` / `mlx/backend/common/metal_kernel.cpp` (mlx 0.32):
the same kernel name, parameter order, address spaces and attribute parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx

# Inputs with fewer elements are passed in the `constant` address space (as in MLX).
MAX_CONSTANT_ARRAY_SIZE = 8
# kMaxThreadgroupSites in include/mlxe_runtime.h.
MAX_THREADGROUP_DECLARATIONS = 256

# Metal attributes MLX adds as parameters when their name occurs in the source, in MLX's order.
METAL_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

# The value of each attribute for fiber `f` of the running launch `L` (mlxe_runtime.h).
_ATTRIBUTE_VALUES = {
    "dispatch_quadgroups_per_threadgroup": "(mlxe::L.dispatch_threads + 3) / 4",
    "dispatch_simdgroups_per_threadgroup": "(mlxe::L.dispatch_threads + 31) / 32",
    "dispatch_threads_per_threadgroup": "mlxe::L.group",
    "grid_origin": "uint3(0u)",
    "grid_size": "mlxe::L.grid",
    "quadgroup_index_in_threadgroup": "f->index / 4",
    "quadgroups_per_threadgroup": "(mlxe::L.tg_threads + 3) / 4",
    "simdgroup_index_in_threadgroup": "f->index / 32",
    "simdgroups_per_threadgroup": "(mlxe::L.tg_threads + 31) / 32",
    "thread_execution_width": "32u",
    "thread_index_in_quadgroup": "f->index % 4",
    "thread_index_in_simdgroup": "f->index % 32",
    "thread_index_in_threadgroup": "f->index",
    "thread_position_in_grid": "f->gpos",
    "thread_position_in_threadgroup": "f->pos",
    "threadgroup_position_in_grid": "mlxe::L.tg_pos",
    "threadgroups_per_grid": "mlxe::L.tgs_per_grid",
    "threads_per_grid": "mlxe::L.grid",
    "threads_per_simdgroup": "32u",
    "threads_per_threadgroup": "mlxe::L.tg_size",
}

TYPE_STRINGS = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
}


def type_string(dtype: mx.Dtype, what: str) -> str:
    """The C type MLX writes for `dtype` (e.g. float16 -> "float16_t")."""
    if dtype == mx.float64:
        raise TypeError(f"{what}: dtype float64 has no Metal type (Metal has no double)")
    if dtype not in TYPE_STRINGS:
        supported = ", ".join(str(d) for d in TYPE_STRINGS)
        raise TypeError(f"{what}: dtype {dtype} is not supported by the emulator ({supported})")
    return TYPE_STRINGS[dtype]


@dataclass(frozen=True)
class InputSpec:
    """What the generated signature depends on for one input array."""

    name: str
    dtype: mx.Dtype
    ndim: int
    size: int

    @property
    def type(self) -> str:
        return type_string(self.dtype, f"input '{self.name}'")

    @property
    def is_scalar(self) -> bool:
        return self.ndim == 0

    @property
    def is_constant(self) -> bool:
        return self.size < MAX_CONSTANT_ARRAY_SIZE


@dataclass(frozen=True)
class KernelSpec:
    """Everything the generated kernel text depends on."""

    name: str
    inputs: tuple[InputSpec, ...]
    output_names: tuple[str, ...]
    output_dtypes: tuple[mx.Dtype, ...]
    template: tuple[tuple[str, bool | int | mx.Dtype], ...]
    source: str
    header: str
    atomic_outputs: bool

    def shape_infos(self, spec: InputSpec) -> tuple[bool, bool, bool]:
        """Whether `<name>_shape`, `_strides`, `_ndim` occur in the source (MLX's test)."""
        if spec.is_scalar:
            return (False, False, False)
        return tuple(f"{spec.name}_{part}" in self.source for part in ("shape", "strides", "ndim"))

    def attributes(self) -> list[tuple[str, str]]:
        return [(name, kind) for name, kind in METAL_ATTRIBUTES if name in self.source]

    def template_declaration(self) -> str:
        """``template <int N, typename T>`` as MLX writes it ("" without template arguments)."""
        if not self.template:
            return ""
        kinds = []
        for name, value in self.template:
            if isinstance(value, bool):
                kind = "bool"
            elif isinstance(value, int):
                kind = "int"
            else:
                kind = "typename"
            kinds.append(f"{kind} {name}")
        return "template <" + ", ".join(kinds) + ">\n"

    def template_values(self) -> list[str]:
        values = []
        for _, value in self.template:
            if isinstance(value, bool):
                values.append(str(int(value)))
            elif isinstance(value, int):
                values.append(str(value))
            else:
                values.append(type_string(value, "template"))
        return values

    def kernel_name(self) -> str:
        """`custom_kernel_<name>[_<template hash>]_<input types>_<output types>`, as MLX."""
        name = "custom_kernel_" + self.name
        if self.template:
            name += "_" + "_" + "_".join(self.template_values())
        for spec in self.inputs:
            name += "_" + spec.type
            if spec.is_scalar:
                name += "s"
            elif spec.is_constant:
                name += "c"
        for dtype in self.output_dtypes:
            name += "_" + type_string(dtype, "output_dtypes")
        return name


def metal_source(spec: KernelSpec) -> str:
    """The Metal source MLX generates (what `verbose=True` prints), without MLX's utils."""
    parts = [spec.header]
    parts.append(spec.template_declaration())
    kname = spec.kernel_name()
    parts.append(f"[[kernel]] void {kname}(\n")
    params = []
    index = 0
    for inp in spec.inputs:
        location = "constant" if inp.is_constant else "device"
        ref = "&" if inp.is_scalar else "*"
        params.append(f"  const {location} {inp.type}{ref} {inp.name} [[buffer({index})]]")
        index += 1
        has_shape, has_strides, has_ndim = spec.shape_infos(inp)
        if has_shape:
            params.append(f"  const constant int* {inp.name}_shape [[buffer({index})]]")
            index += 1
        if has_strides:
            params.append(f"  const constant int64_t* {inp.name}_strides [[buffer({index})]]")
            index += 1
        if has_ndim:
            params.append(f"  const constant int& {inp.name}_ndim [[buffer({index})]]")
            index += 1
    for name, dtype in zip(spec.output_names, spec.output_dtypes):
        type_ = type_string(dtype, f"output '{name}'")
        if spec.atomic_outputs:
            type_ = f"atomic<{type_}>"
        params.append(f"  device {type_}* {name} [[buffer({index})]]")
        index += 1
    for name, kind in spec.attributes():
        params.append(f"  {kind} {name} [[{name}]]")
    parts.append(",\n".join(params) + ") {\n")
    parts.append(spec.source)
    parts.append("\n}\n")
    if spec.template:
        template_def = kname + "<" + ", ".join(spec.template_values()) + ">"
        parts.append(
            f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({template_def}) '
            f"{template_def};\n"
        )
    return "".join(parts)


# ------------------------------------------------------------------------------------------
# Metal -> C++ pre-pass. Only what C++ cannot express with the shim's macros and types.

_TYPE = r"[A-Za-z_][\w:]*(?:\s*<[^<>;{}()]*(?:<[^<>;{}()]*>[^<>;{}()]*)*>)?"
_METAL_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<metal_\w+>.*$", re.MULTILINE)
_HALF_LITERAL = re.compile(r"(?<![\w.])((?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)[hH]\b")
_THREADGROUP_DECL = re.compile(
    rf"\bthreadgroup\s+((?:const\s+)?{_TYPE})\s+([A-Za-z_]\w*)\s*((?:\[[^\]]+\]\s*)*);"
)
# Declarations the pre-pass cannot rewrite: several names, or an initializer (not Metal).
_UNSUPPORTED_THREADGROUP = re.compile(
    rf"\bthreadgroup\s+(?:const\s+)?{_TYPE}\s+[A-Za-z_]\w*\s*(?:\[[^\]]+\]\s*)*"
    rf"(?:=|,\s*[A-Za-z_]\w*\s*[\[;,])"
)
_DEVICE_POINTER = re.compile(rf"(?<![\w])(const\s+)?device\s+(const\s+)?({_TYPE})\s*(const\s*)?\*")
_DEVICE_REFERENCE = re.compile(
    rf"(?<![\w])(const\s+)?device\s+(const\s+)?({_TYPE})\s*(const\s*)?&(?!&)"
)
_CONSTANT_POINTER = re.compile(
    rf"(?<![\w])(?:const\s+)?constant\s+(?:const\s+)?({_TYPE})\s*(?:const\s*)?\*"
)
_CONSTANT_REFERENCE = re.compile(
    rf"(?<![\w])(?:const\s+)?constant\s+(?:const\s+)?({_TYPE})\s*(?:const\s*)?&(?!&)"
)
_THREADGROUP_POINTER = re.compile(
    rf"(?<![\w])(const\s+)?threadgroup\s+(const\s+)?({_TYPE})\s*(const\s*)?\*"
)
_CASTS = re.compile(r"\b(?:reinterpret_cast|const_cast)\s*<")
_SWIZZLE = re.compile(r"(?<=[\w\])])\.([xyzw]{2,4})\b(?!\s*\()")


def _threadgroup_storage(match: re.Match, site: int) -> str:
    type_, name, dims = match.group(1), match.group(2), match.group(3)
    sizes = re.findall(r"\[([^\]]+)\]", dims)
    if sizes:
        inner = type_ + "".join(f"[{s}]" for s in sizes[1:])
        storage = f"mlxe::tg_array<{inner}, ({sizes[0]})>"
    else:
        storage = type_
    return f'auto& {name} = mlxe::tg_alloc<{storage}>({site}, "{name}");'


def _device_pointer(match: re.Match) -> str:
    const = bool(match.group(1) or match.group(2) or match.group(4))
    return f"mlxe::device_ptr<{'const ' if const else ''}{match.group(3)}>"


def _threadgroup_pointer(match: re.Match) -> str:
    const = bool(match.group(1) or match.group(2))
    return f"mlxe::tg_ptr<{'const ' if const else ''}{match.group(3)}>"


def _device_reference(match: re.Match) -> str:
    type_ = match.group(3)
    if match.group(1) or match.group(2) or match.group(4):
        return f"const {type_}&"
    # A writable device reference must count its reads and writes: it becomes a proxy.
    return f"{type_}&" if re.match(r"(metal::)?atomic", type_) else f"mlxe::dref<{type_}>"


def _swizzle(match: re.Match) -> str:
    lanes = ", ".join(str("xyzw".index(c)) for c in match.group(1))
    return f".template swizzle<{lanes}>()"


def to_cpp(text: str, first_site: int = 0) -> tuple[str, int]:
    """Rewrite Metal text as C++ for the shim; returns the text and the next threadgroup site.

    Line numbers are kept so compiler messages and emulator errors point at the user's text.
    """
    unsupported = _UNSUPPORTED_THREADGROUP.search(text)
    if unsupported:
        raise ValueError(
            f"the emulator takes one `threadgroup` variable per declaration, without an "
            f"initializer (`threadgroup T name[N];`); got {unsupported.group(0)!r}"
        )
    text = _METAL_INCLUDE.sub("", text)
    text = _HALF_LITERAL.sub(r"half(\1f)", text)
    site = first_site

    def storage(match: re.Match) -> str:
        nonlocal site
        site += 1
        return _threadgroup_storage(match, site - 1)

    text = _THREADGROUP_DECL.sub(storage, text)
    text = _THREADGROUP_POINTER.sub(_threadgroup_pointer, text)
    text = _CONSTANT_POINTER.sub(r"mlxe::constant_ptr<const \1>", text)
    text = _CONSTANT_REFERENCE.sub(r"const \1&", text)
    text = _DEVICE_POINTER.sub(_device_pointer, text)
    text = _DEVICE_REFERENCE.sub(_device_reference, text)
    text = _CASTS.sub("mlxe::ptr_cast<", text)
    text = _SWIZZLE.sub(_swizzle, text)
    return text, site


def file_names(spec: KernelSpec) -> tuple[str, str]:
    """The names the C++ gives the kernel's `source` and `header` (compiler messages, gdb)."""
    label = re.sub(r"[^\w.-]", "_", spec.name)
    return f"{label}.metal", f"{label}.h"


def cpp_source(spec: KernelSpec) -> str:
    """The C++ translation unit for the emulator: shim, header, kernel, launch entry point."""
    header, next_site = to_cpp(spec.header)
    body, sites = to_cpp(spec.source, next_site)
    if sites > MAX_THREADGROUP_DECLARATIONS:
        raise ValueError(
            f"kernel '{spec.name}': {sites} `threadgroup` declarations, the emulator takes at "
            f"most {MAX_THREADGROUP_DECLARATIONS}"
        )
    kname = spec.kernel_name()
    source_file, header_file = file_names(spec)
    params, args = [], []
    for index, inp in enumerate(spec.inputs):
        if inp.is_scalar:
            params.append(f"const {inp.type}& {inp.name}")
            args.append(f"mlxe::scalar_arg<const {inp.type}>({index})")
            continue
        # Small inputs are bound in the constant address space, as MLX does.
        space = "constant" if inp.is_constant else "device"
        params.append(f"mlxe::{space}_ptr<const {inp.type}> {inp.name}")
        args.append(f"mlxe::buffer_arg<const {inp.type}, mlxe::{space.upper()}>({index})")
        has_shape, has_strides, has_ndim = spec.shape_infos(inp)
        if has_shape:
            params.append(f"mlxe::constant_ptr<const int> {inp.name}_shape")
            args.append(f"mlxe::constant_ptr<const int>(mlxe::L.bufs[{index}].shape)")
        if has_strides:
            params.append(f"mlxe::constant_ptr<const int64_t> {inp.name}_strides")
            args.append(f"mlxe::constant_ptr<const int64_t>(mlxe::L.bufs[{index}].strides)")
        if has_ndim:
            params.append(f"const int& {inp.name}_ndim")
            args.append(f"mlxe::L.bufs[{index}].ndim")
    for offset, (name, dtype) in enumerate(zip(spec.output_names, spec.output_dtypes)):
        type_ = type_string(dtype, f"output '{name}'")
        if spec.atomic_outputs:
            type_ = f"metal::atomic<{type_}>"
        params.append(f"mlxe::device_ptr<{type_}> {name}")
        args.append(f"mlxe::buffer_arg<{type_}>({len(spec.inputs) + offset})")
    for name, kind in spec.attributes():
        params.append(f"{kind} {name}")
        args.append(_ATTRIBUTE_VALUES[name])

    template_line, call = "", kname
    if spec.template:
        template_line = spec.template_declaration()
        call = kname + "<" + ", ".join(spec.template_values()) + ">"

    return "".join(
        [
            '#include "mlxe_shim.h"\n',
            # Metal has no double: any use in the kernel's own text is an error.
            "using mlxe_seconds = double;\n",
            "#pragma GCC poison double\n",
            f'#line 1 "{header_file}"\n',
            header,
            "\n",
            template_line,
            f"void {kname}(\n    " + ",\n    ".join(params) + ") {\n",
            f'#line 1 "{source_file}"\n',
            body,
            "\n}\n",
            '#line 1 "emulator"\n',
            "static void mlxe_thread_main(mlxe::Fiber* f) {\n",
            "  (void)f;\n",
            f"  {call}(\n      " + ",\n      ".join(args) + ");\n",
            "}\n",
            'extern "C" int mlxe_launch(mlxe::Buffer* bufs, const int64_t* grid,\n',
            "                           const int64_t* group, uint64_t seed, int order,\n",
            "                           mlxe_seconds timeout, char* err, int64_t errlen) {\n",
            "  return mlxe::launch(&mlxe_thread_main, bufs, grid, group, seed, order, timeout,\n",
            "                      err, errlen);\n",
            "}\n",
        ]
    )
