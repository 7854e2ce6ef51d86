"""Build and install tempsoft, with its native extension tempsoft._C.

Install against the torch already in the environment (the extension is compiled for that
torch's ABI, so build isolation must be off)::

    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    pip install --no-build-isolation -e .          # or: python setup.py build_ext --inplace

What is compiled:
  * csrc/module.cpp -> tempsoft._C: the op schemas, compiled without SIMD flags (it loads on
    any CPU); + csrc/cuda/*.cpp and csrc/cuda/*.cu with -DTEMPSOFT_WITH_CUDA, when the
    installed torch has CUDA (torch.version.cuda) and nvcc is found (CUDA_HOME, else nvcc on
    PATH).
  * csrc/cpu/*.cpp once per SIMD capability level -> tempsoft._cpu_default, _cpu_avx2 and
    _cpu_avx512 on x86-64 (only _cpu_default elsewhere): C++17, -O3, OpenMP, at::vec SIMD at
    that level. At run time tempsoft loads the best level the CPU supports (as ATen does
    with its CPU_CAPABILITY), so one build runs on any x86-64 CPU; TEMPSOFT_CPU_CAPABILITY
    forces a level at run time.

Environment knobs (all optional):
  TEMPSOFT_CPU_LEVELS      comma-separated subset of default,avx2,avx512 to build (default:
      all that the platform has; a subset builds faster, e.g. for development).
  TEMPSOFT_BUILD_EXT=0     skip the extension (pure-Python install; the "torch" backend
      serves every op).
  TEMPSOFT_REQUIRE_EXT=1   fail the install when a module does not compile (by default a
      failed compile warns and installs without that module).
  TEMPSOFT_WITH_CUDA=0     build the CPU kernels only, even when CUDA is available.
  TORCH_CUDA_ARCH_LIST     CUDA targets; defaults to "8.0;9.0" (A100, H100) when unset.
  CUDA_HOME                the CUDA toolkit to use.
  MAX_JOBS                 parallel compile jobs for ninja.

Builds are incremental: ninja recompiles only the sources that changed (build/ keeps the
object files, one directory per module).
"""
from __future__ import annotations

import glob
import os
import platform
import shutil
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

INSTALL_REQUIRES = [
    "torch>=2.6",          # the oldest stack CI tests (.ci/run), with triton 3.2
    "numpy",
    "tqdm",
    "matplotlib",
    "scipy",
    "scikit-learn",
    "pillow",
    "tomli; python_version<'3.11'",
    "pyautoattack>=0.2",   # the reference AutoAttack and Square Attack in the audit
]
EXTRAS_REQUIRE = {
    "triton": ["triton>=3.2"],
    "test": ["pytest", "hypothesis", "pytest-benchmark"],
    "bench": ["triton>=3.2", "liger-kernel"],
    "ray": ["ray>=2.9"],              # tempsoft reproduce --executor ray
    "slurm": ["submitit>=1.5"],       # tempsoft reproduce --executor slurm
}

# SIMD capability levels of the CPU kernels, lowest first, and their -march-free flags.
# CPU_CAPABILITY names the inline namespace that ATen's vector types live in
# (at::vec::AVX2::Vectorized, ...), so these objects agree with the ones torch compiled for
# the same level; CPU_CAPABILITY_<X> selects the implementation. Each level is its own
# shared library, so inline functions compiled with one level's flags never serve another.
_LEVEL_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def _log(msg: str) -> None:
    print(f"tempsoft setup: {msg}", file=sys.stderr)


def _cpu_levels() -> list[str]:
    """The capability levels to build: every level on x86-64 with GCC or Clang, "default"
    elsewhere; TEMPSOFT_CPU_LEVELS (comma-separated) builds a subset."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    available = list(_LEVEL_FLAGS) if x86 and sys.platform != "win32" else ["default"]
    requested = os.environ.get("TEMPSOFT_CPU_LEVELS", "").strip().lower()
    if not requested:
        return available
    levels = [level.strip() for level in requested.split(",") if level.strip()]
    unknown = [level for level in levels if level not in available]
    if unknown:
        raise ValueError(
            f"TEMPSOFT_CPU_LEVELS: {', '.join(unknown)} cannot be built here; this platform "
            f"builds {', '.join(available)}"
        )
    return levels


def _torch_uses_openmp(torch) -> bool:
    """Whether ATen's parallel backend is OpenMP (then at::parallel_for needs -fopenmp here)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _guess_cuda_home() -> None:
    """Set CUDA_HOME, when neither it nor CUDA_PATH is set, to a toolkit that has headers.

    torch takes the parent of the `nvcc` on PATH, which is wrong when that nvcc is a
    wrapper script (/usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc); then
    cuda_runtime.h is missing.  Must run before torch.utils.cpp_extension is imported.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _with_cuda(torch, cuda_home) -> bool:
    if os.environ.get("TEMPSOFT_WITH_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and cuda_home is not None


def _extensions_and_cmdclass():
    """([the extension modules], {"build_ext": ...}), or ([], {}) when they cannot be built."""
    if os.environ.get("TEMPSOFT_BUILD_EXT", "1") == "0":
        _log("TEMPSOFT_BUILD_EXT=0: installing without the native extension")
        return [], {}
    _guess_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if os.environ.get("TEMPSOFT_REQUIRE_EXT") == "1":
            raise
        warnings.warn(
            f"tempsoft: torch is not importable at build time ({exc}); installing without the "
            "native extension. Install torch first and use `pip install --no-build-isolation .`"
        )
        return [], {}

    levels = _cpu_levels()
    openmp = _torch_uses_openmp(torch) and sys.platform != "win32"
    # -g0 overrides the -g that Python adds: 0.4 MB instead of 15 MB of .so, faster to build.
    # -ffp-contract=off: the kernels write every multiply-add they want fused as an explicit
    # fmadd; left to GCC's default, `a * b + c` was fused in some template instantiations and
    # not in others, so the same row's fp64 loss differed in its last bit between grad modes.
    cxx = ["-O3", "-g0", "-fno-math-errno", "-ffp-contract=off", "-Wall",
           "-Wno-unknown-pragmas",
           # GCC 12 reports its own AVX-512 intrinsics (`__m512 __Y = __Y;`) as uninitialized.
           "-Wno-maybe-uninitialized", "-Wno-uninitialized"]
    cuda_home = getattr(cpp_extension, "CUDA_HOME", None)
    use_cuda = _with_cuda(torch, cuda_home)
    _log(f"torch {torch.__version__}, CPU levels {', '.join(levels)}, OpenMP {openmp}, "
         f"CUDA {'yes (' + str(cuda_home) + ')' if use_cuda else 'no'}")

    # The schemas (and the CUDA kernels): no SIMD flags, so it loads on any CPU.
    main_sources = [os.path.join("csrc", "module.cpp")]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        main_sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        main_sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extensions = [cpp_extension.CUDAExtension(
            "tempsoft._C",
            main_sources,
            extra_compile_args={
                "cxx": cxx + ["-DTEMPSOFT_WITH_CUDA"],
                "nvcc": ["-O3", "-DTEMPSOFT_WITH_CUDA", "-lineinfo"],
            },
        )]
    else:
        extensions = [cpp_extension.CppExtension(
            "tempsoft._C", main_sources, extra_compile_args={"cxx": cxx})]

    # The CPU kernels, once per capability level.
    level_cxx = list(cxx)
    if openmp:
        # ATen/Config.h says AT_PARALLEL_OPENMP=1 for such a torch; without -fopenmp the
        # `#pragma omp parallel` inside at::parallel_for would be ignored and run serially.
        level_cxx.append("-fopenmp")
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    for level in levels:
        extensions.append(cpp_extension.CppExtension(
            f"tempsoft._cpu_{level}",
            cpu_sources,
            extra_compile_args={"cxx": level_cxx + _LEVEL_FLAGS[level]},
            extra_link_args=["-fopenmp"] if openmp else [],
        ))

    class BuildExt(cpp_extension.BuildExtension):
        """Ninja build; a failed compile warns and installs the pure-Python package."""

        def initialize_options(self):
            super().initialize_options()
            self.failed = set()  # names of the extensions that did not compile

        def finalize_options(self):
            super().finalize_options()
            # An editable install builds in a fresh temporary directory each time, which
            # makes ninja recompile everything; a fixed directory keeps rebuilds incremental.
            if getattr(self, "editable_mode", False):
                self.build_temp = os.path.join(ROOT, "build", "temp-editable")

        def build_extension(self, extension):
            # The level modules compile the same sources with different flags: each module
            # gets its own object directory (and ninja file), or they would overwrite each
            # other's objects and rebuild everything every time.
            base_temp = self.build_temp
            self.build_temp = os.path.join(base_temp, extension.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(extension)
            except Exception as exc:  # noqa: BLE001 - compiler/linker errors come in many types
                if os.environ.get("TEMPSOFT_REQUIRE_EXT") == "1":
                    raise
                self.failed.add(extension.name)
                _log(f"building {extension.name} FAILED ({exc}); installing without it: the "
                     "pure-PyTorch backend (and Triton where it runs) will serve the ops. Set "
                     "TEMPSOFT_REQUIRE_EXT=1 to make this an error.")
            finally:
                self.build_temp = base_temp

        # The steps after the build (the in-place copy of `build_ext --inplace` and of
        # editable installs, the list of installed files) must not look for a failed
        # extension's library.
        def _built(self):
            return [e for e in self.extensions if e.name not in self.failed]

        def copy_extensions_to_source(self):
            every, self.extensions = self.extensions, self._built()
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = every

        def get_outputs(self):
            every, self.extensions = self.extensions, self._built()
            try:
                return super().get_outputs()
            finally:
                self.extensions = every

        def get_output_mapping(self):
            every, self.extensions = self.extensions, self._built()
            try:
                return super().get_output_mapping()
            finally:
                self.extensions = every

    return extensions, {"build_ext": BuildExt.with_options(use_ninja=True)}


def _read(name: str) -> str:
    path = os.path.join(ROOT, name)
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


ext_modules, cmdclass = _extensions_and_cmdclass()

setup(
    name="tempsoft",
    version="0.1.0",
    description="Fused temperature-scaled softmax cross-entropy kernels (C++, CUDA, Triton) "
    "and adversarial-robustness experiments at temperature T",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tempsoft*"]),
    package_data={"tempsoft.study": ["presets/*.toml"]},   # the presets ship with the wheel
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["tempsoft = tempsoft.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
