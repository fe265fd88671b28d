from setuptools import find_packages, setup

setup(
    name="gift",
    version="0.1.0",
    description="GIFT (Generative Interpretable Fine-tuning Transformers) for timm Vision Transformers, "
    "with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gift", "gift.*", "gift_kernels", "gift_kernels.*"]),
    install_requires=[
        "torch>=2.1",
        "triton>=2.1",
        "timm>=1.0",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pillow>=9.0",
    ],
    extras_require={
        "dev": ["pytest>=7.0", "pytest-benchmark>=4.0", "peft>=0.10", "matplotlib>=3.6", "transformers>=4.40"],
    },
    entry_points={"console_scripts": ["gift=gift.cli:main"]},
)
