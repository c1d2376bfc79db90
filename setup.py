from setuptools import find_packages, setup

setup(
    name="qwenvl-kernels",
    version="0.1.0",
    description="A lean PyTorch Qwen-VL with hand-written Triton kernels (forward and backward)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["qwenvl", "qwenvl.*", "qwenvl_kernels", "qwenvl_kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors",
        "numpy",
        "pillow",
        "tiktoken",
        "tqdm",
    ],
    extras_require={
        # patch_official_model works on a model built by transformers and the official remote code
        "official": ["transformers>=4.32,<6"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib"],
    },
    entry_points={"console_scripts": ["qwenvl=qwenvl.cli:main"]},
)
