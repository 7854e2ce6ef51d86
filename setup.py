"""Build and install tempsoft, with its native extension tempsoft._C.

Install against the torch already in the environment (the extension is compiled for that
torch's ABI, so build isolation must be off)::

    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    pip install --no-build-isolation -e .          # or: python setup.py build_ext --inplace

What is compiled:
  * csrc/module.cpp + csrc/cpu/*.cpp  -> tempsoft._C (C++17, -O3, OpenMP, at::vec SIMD).
  * + csrc/cuda/*.cpp and csrc/cuda/*.cu with -DTEMPSOFT_WITH_CUDA, when the installed torch
    has CUDA (torch.version.cuda) and nvcc is found (CUDA_HOME, else nvcc on PATH).

Environment knobs (all optional):
  TEMPSOFT_CPU_CAPABILITY  auto (default) | avx512 | avx2 | default.  "auto" picks the best
      SIMD level the *build* machine supports, so the binary may not run on an older CPU:
      set "avx2" (any x86-64 CPU since 2013) or "default" (no SIMD flags) to build a
      binary for other machines.  Non-x86 machines always use "default" (plus the
      compiler's own baseline, e.g. NEON on aarch64).
  TEMPSOFT_BUILD_EXT=0     skip the extension (pure-Python install; the "torch" backend
      serves every op).
  TEMPSOFT_REQUIRE_EXT=1   fail the install when the extension does not compile (by default
      a failed compile warns and installs without it).
  TEMPSOFT_WITH_CUDA=0     build the CPU kernels only, even when CUDA is available.
  TORCH_CUDA_ARCH_LIST     CUDA targets; defaults to "8.0;9.0" (A100, H100) when unset.
  CUDA_HOME                the CUDA toolkit to use.
  MAX_JOBS                 parallel compile jobs for ninja.

Builds are incremental: ninja recompiles only the sources that changed (build/ keeps the
object files).
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
    "torch>=2.4",
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
    "triton": ["triton>=3.0"],
    "test": ["pytest", "hypothesis", "pytest-benchmark"],
    "bench": ["triton>=3.0", "liger-kernel"],
    "ray": ["ray>=2.9"],              # tempsoft reproduce --executor ray
    "slurm": ["submitit>=1.5"],       # tempsoft reproduce --executor slurm
}

# -march-free SIMD levels for at::vec.  CPU_CAPABILITY names the inline namespace that
# ATen's vector types live in (at::vec::AVX2::Vectorized, ...), so these objects agree with
# the ones torch compiled for the same level; CPU_CAPABILITY_<X> selects the implementation.
_CAPABILITY_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}
# CPU flags (as /proc/cpuinfo spells them) each level needs.
_CAPABILITY_NEEDS = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
    "avx2": {"avx2", "fma", "f16c"},
}


def _log(msg: str) -> None:
    print(f"tempsoft setup: {msg}", file=sys.stderr)


def _cpu_flags() -> set[str]:
    """The build machine's CPU feature flags (Linux); empty when they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_capability() -> str:
    """The at::vec level to compile for: TEMPSOFT_CPU_CAPABILITY, else the best one here."""
    requested = os.environ.get("TEMPSOFT_CPU_CAPABILITY", "auto").strip().lower()
    if requested not in ("auto", *_CAPABILITY_FLAGS):
        raise ValueError(
            f"TEMPSOFT_CPU_CAPABILITY must be auto, {', '.join(_CAPABILITY_FLAGS)}; "
            f"got {requested!r}"
        )
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    if not x86 or sys.platform == "win32":
        return "default"
    if requested != "auto":
        return requested
    flags = _cpu_flags()
    if not flags:
        # No /proc/cpuinfo (macOS x86): if torch dispatches to AVX2 or better here, so do we
        # (AVX2 only: the cheaper assumption).
        try:
            import torch

            if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
                flags = set(_CAPABILITY_NEEDS["avx2"])
        except Exception:  # noqa: BLE001 - any failure means "no SIMD flags"
            flags = set()
    for level in ("avx512", "avx2"):
        if _CAPABILITY_NEEDS[level] <= flags:
            return level
    return "default"


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
    """([tempsoft._C extension], {"build_ext": ...}), or ([], {}) when it cannot be built."""
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

    capability = _cpu_capability()
    openmp = _torch_uses_openmp(torch) and sys.platform != "win32"
    # -g0 overrides the -g that Python adds: 0.4 MB instead of 15 MB of .so, faster to build.
    cxx = ["-O3", "-g0", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas",
           # GCC 12 reports its own AVX-512 intrinsics (`__m512 __Y = __Y;`) as uninitialized.
           "-Wno-maybe-uninitialized", "-Wno-uninitialized"]
    cxx += _CAPABILITY_FLAGS[capability]
    if openmp:
        # ATen/Config.h says AT_PARALLEL_OPENMP=1 for such a torch; without -fopenmp the
        # `#pragma omp parallel` inside at::parallel_for would be ignored and run serially.
        cxx.append("-fopenmp")
    link = ["-fopenmp"] if openmp else []

    sources = [os.path.join("csrc", "module.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_home = getattr(cpp_extension, "CUDA_HOME", None)
    use_cuda = _with_cuda(torch, cuda_home)
    _log(f"torch {torch.__version__}, CPU capability {capability}, OpenMP {openmp}, "
         f"CUDA {'yes (' + str(cuda_home) + ')' if use_cuda else 'no'}")

    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        ext = cpp_extension.CUDAExtension(
            "tempsoft._C",
            sources,
            extra_compile_args={
                "cxx": cxx + ["-DTEMPSOFT_WITH_CUDA"],
                "nvcc": ["-O3", "-DTEMPSOFT_WITH_CUDA", "-lineinfo"],
            },
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "tempsoft._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )

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
            try:
                super().build_extension(extension)
            except Exception as exc:  # noqa: BLE001 - compiler/linker errors come in many types
                if os.environ.get("TEMPSOFT_REQUIRE_EXT") == "1":
                    raise
                self.failed.add(extension.name)
                _log(f"building {extension.name} FAILED ({exc}); installing without it: the "
                     "pure-PyTorch backend (and Triton where it runs) will serve the ops. Set "
                     "TEMPSOFT_REQUIRE_EXT=1 to make this an error.")

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

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


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
