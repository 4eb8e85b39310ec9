# A transformers checkpoint's config.json on the product path (no preset): Phi3, which vcr builds
# as transformers' own implementation, warmed by `vcr warm` with its defaults into a directory,
# then a rank per side from it (bench_load.py --cache file, one new node and a restart). ~90 s.
. benchmarks/device/env.sh
M=/root/phi3-cfg
python - "$M" <<'PY'
import sys, transformers
transformers.Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=4,
                        num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                        max_position_embeddings=4096,
                        architectures=["Phi3ForCausalLM"]).save_pretrained(sys.argv[1])
PY
python benchmarks/bench_load.py --device cuda --model $M --sizes 1,8,64 --cache file \
  --repeats 1 --skip-cold --json $OUT/hf_load.json 2>&1 | grep -v Warning | tail -25
