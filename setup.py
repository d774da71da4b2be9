from setuptools import find_packages, setup

setup(
    name="torchremote",
    version="0.1.0",
    description="Compute on tensors that live on another machine, with the PyTorch code you have",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["torchremote", "torchremote.*"]),
    package_data={"torchremote.worker.console": ["static/*"]},
    python_requires=">=3.11",
    install_requires=["torch>=2.4", "websockets>=14", "msgpack>=1.0", "tqdm>=4.60", "cloudpickle>=2.0",
                      "safetensors>=0.4"],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "psutil>=5.9", "numpy>=1.26",
                 "trustme>=1.0", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29",
                 "expecttest>=0.2", "transformers>=4.40", "ray>=2.9", "aiohttp>=3.9",
                 "prometheus-client>=0.17", "playwright>=1.40"],
        "ray": ["ray>=2.9"],
        "console": ["aiohttp>=3.9", "prometheus-client>=0.17"],
        "bench": ["matplotlib>=3.7", "psutil>=5.9", "transformers>=4.40"],
    },
    entry_points={"console_scripts": ["torchremote=torchremote.cli:main"]},
)
