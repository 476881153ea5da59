"""fedge: on-device federated learning for edge and IoT fleets.

The base install is what a device needs (no torch); the ``sdk`` extra adds the
host-side tooling (export, bundle building, aggregators, simulation, CLI).
"""

from setuptools import find_packages, setup

DEVICE_REQUIRES = [
    "numpy>=1.24",
    "onnxruntime-training-cpu==1.19.2",
    "paho-mqtt>=2.1,<3",
    "cryptography>=42",
    "tomli>=2; python_version<'3.11'",
]

SDK_REQUIRES = [
    # torch is pinned to the CPU build: a looser spec pulls gigabytes of CUDA wheels.
    "torch==2.13.0",
    # ORT 1.19 loads ONNX IR <= 10; onnx 1.17+ writes newer IR by default.
    "onnx>=1.16,<1.17",
    "click>=8.1",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "scikit-learn>=1.3",
    "seglearn==1.2.5",
    # embedded MQTT broker for `fedge demo` on machines without Mosquitto (host only, ~24 MB)
    "amqtt==0.12.1",
]

TEST_REQUIRES = ["pytest>=8", "pytest-timeout>=2.3"]

setup(
    name="fedge",
    version="0.1.0",
    description="On-device federated learning SDK for edge and IoT fleets (ONNX Runtime training, MQTT)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["sdk", "sdk.*", "device_agent", "device_agent.*"]),
    package_data={"sdk": ["py.typed"], "device_agent": ["py.typed"]},
    install_requires=DEVICE_REQUIRES,
    extras_require={"sdk": SDK_REQUIRES, "test": TEST_REQUIRES},
    entry_points={
        "console_scripts": [
            "fedge=sdk.cli.main:main",
            "fedge-agent=device_agent.cli:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
