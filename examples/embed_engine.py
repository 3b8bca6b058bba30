"""Embed the engine in a Python program: a shared system prompt served from the prefix cache."""

from radixserve import Engine, SamplingParams

SYSTEM = "You are a concise assistant. Answer in one short sentence."
QUESTIONS = ["What is a radix tree?", "What is a KV cache?", "Why reuse prefixes?"]


def main() -> None:
    params = SamplingParams(max_tokens=48, temperature=0.0)
    with Engine() as engine:
        for q in QUESTIONS:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
            out = engine.chat(messages, params)
            print(f"Q: {q}\nA: {out.text.strip()}\n   ({out.cached_tokens} of "
                  f"{len(out.prompt_token_ids)} prompt tokens from the cache)\n")
        stats = engine.stats()
        print(f"hit rate {stats['hit_rate']:.2f} over {stats['queried_tokens']} prompt tokens")


if __name__ == "__main__":
    main()
