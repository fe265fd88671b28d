from setuptools import find_packages, setup

EXTRAS = {
    "lora": ["peft>=0.10"],            # --method lora and `gift demo` (its LoRA baseline)
    "plots": ["matplotlib>=3.6"],      # curves.png of `gift finetune`, results.png of `gift report`
    "triton": ["triton>=3.0"],         # fused kernels on CUDA; the torch path runs without it
    "nf4": ["torchao>=0.18"],          # --backbone-dtype nf4 (4-bit frozen linear weights)
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})
EXTRAS["dev"] = EXTRAS["all"] + ["pytest>=7.0", "pytest-benchmark>=4.0", "transformers>=4.40",
                                  "import-linter>=2.3", "ruff>=0.5"]  # make test: lint-imports (2.3: as_packages), ruff

setup(
    name="gift",
    version="0.1.0",
    description="GIFT (Generative Interpretable Fine-tuning Transformers) for timm Vision Transformers, "
    "with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author="The gift contributors",
    url="https://arxiv.org/abs/2312.00700",
    license="MIT",
    classifiers=["License :: OSI Approved :: MIT License", "Programming Language :: Python :: 3",
                 "Topic :: Scientific/Engineering :: Artificial Intelligence", "Typing :: Typed"],
    python_requires=">=3.10",
    packages=find_packages(include=["gift", "gift.*", "gift_kernels", "gift_kernels.*"]),
    package_data={"gift": ["py.typed", "recipes/*.yaml"]},
    install_requires=[
        "torch>=2.3",                  # torch.amp.GradScaler(device) (the training loop) is new in 2.3
        "timm>=1.0",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pillow>=9.0",
        "pyyaml>=5.4",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["gift=gift.app.cli:main"]},
)
