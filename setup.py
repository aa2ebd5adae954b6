"""threed: text-to-3D by optimisation (score distillation, CLIP guidance), CPU-testable, no CUDA build."""

from setuptools import find_packages, setup

setup(
    name="threed",
    version="0.2.0",
    description="Text-to-3D generation by optimisation: SDS / CLIP guidance on a hash-grid NeRF, mesh export",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["threed", "threed.*", "exporters", "exporters.*"]),
    # the report pages' scripts and style, copied beside every report.html (threed/report.py)
    package_data={"threed": ["../configs/*.yaml", "web/*.js", "web/*.css", "web/vendor/three.min.js",
                             "web/vendor/LICENSE-three.txt"]},
    data_files=[],
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.30",
        "transformers>=4.40",
        "huggingface_hub>=0.23",
        "safetensors",
        "peft>=0.17",  # LoRA adapters on the UNet (ProlificDreamer's particle score), via diffusers' add_adapter
        "open_clip_torch>=2.24",
        "trimesh>=4.0",
        "pymcubes>=0.1.4",
        "imageio>=2.31",
        "imageio-ffmpeg>=0.4.9",
        "fast-simplification>=0.1.7",
        # UV atlases for textured export: chart segmentation, parametrisation and packing in one
        # maintained C++ library with wheels; none of that is ours to rewrite.
        "xatlas>=0.0.11",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "numpy",
        "scipy",
        "pillow",
        "matplotlib>=3.7",  # benchmark plots (threed bench)
    ],
    extras_require={
        # nerfacc JIT-builds its CUDA kernels on first use on a GPU; tinycudann must be built from source.
        "cuda": ["nerfacc>=0.5.3"],
        # DreamGaussian's splatting on CUDA (gaussians.backend=auto|gsplat); JIT-builds its kernels on first use
        "gsplat": ["gsplat>=1.5,<2"],
        # image-to-3D from a photo without transparency: rembg cuts the object out (its model downloads on first use)
        "image": ["rembg[cpu]>=2.0.50"],
        # threed bench --ray: entries as Ray tasks across GPUs and nodes (imported only when asked for).
        "ray": ["ray>=2.9"],
        # playwright drives the system Chromium (apt-get install chromium) for the report pages' browser tests.
        # gsplat: its PyTorch references run its rasterization() on a CPU (tests/gsplat_cpu.py), so the suite
        # checks the gsplat backend without CUDA; pinned, as they are private API. Nothing is built on a CPU.
        "test": ["pytest>=7", "pytest-xdist>=3.5", "pygltflib>=1.16", "playwright>=1.40", "ray>=2.9",
                 "gsplat==1.5.3"],
    },
    entry_points={"console_scripts": ["threed=threed.cli:main"]},
)
