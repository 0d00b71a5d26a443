# Hugging Face `tokenizers` encoding speed on the same corpus as benches/tokenizer.rs.
#   pip install tokenizers
#   RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false python3 benches/hf_tokenizer_bench.py
import gzip, os, time
from tokenizers import Tokenizer

root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tokenizers")
corpus = gzip.open(os.path.join(root, "corpus.txt.gz")).read().decode()
for name in ["smollm2", "llama3", "llama4", "spm-mistral"]:
    tok = Tokenizer.from_str(gzip.open(os.path.join(root, name, "tokenizer.json.gz")).read().decode())
    tok.encode(corpus, add_special_tokens=False)  # warm up (fills HF's word cache, as in criterion)
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        for _ in range(10):
            tok.encode(corpus, add_special_tokens=False)
        best = min(best, (time.perf_counter() - t) / 10)
    print(f"{name}: {best * 1e3:.3f} ms per encode, {len(corpus) / best / 1e6:.2f} MB/s")
