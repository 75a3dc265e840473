"""Teaching a pipeline a new concept: Textual Inversion, HyperNetwork, DreamBooth, LoRA (notebooks 02-05).

One training loop (``engine.train``) serves all four; each method's module says what trains and how it
is saved. Every run writes ``adapter.json`` (method, phrase, class word, settings) beside its files, so
``load_adapter`` can put any of them on a fresh pipeline:

    pipe = load_pipeline(dtype=torch.float32)                                 # train in float32, also on a GPU
    result = train_concept(pipe, "koala", "lora", out="runs/koala-lora")      # trains pipe in place
    images = generate(pipe, f"a {result.phrase} on the left", seed=0)         # "a bbm bear on the left"

    base = load_pipeline()
    meta = load_adapter(base, "runs/koala-lora")                              # same images as above

| method | what trains | prompt phrase | files |
|---|---|---|---|
| ``textual_inversion`` | new token embedding(s) | ``<koala>`` | learned_embeds.safetensors, koala.pt (webui) |
| ``hypernetwork`` | K/V context MLPs | the class word | koala.pt (webui) |
| ``dreambooth`` | the UNet (± text encoder) | ``bbm bear`` | unet/ (± text_encoder/), fp16 |
| ``lora`` | low-rank A, B in attention | ``bbm bear`` | pytorch_lora_weights.safetensors, koala_kohya.safetensors |

Command line: ``mcteach train --method lora --concept data/concepts/koala --out runs/koala-lora``
and ``mcteach generate --adapter runs/koala-lora --prompt "a bbm bear on the left" --out k.png``
(each concept gets its own identifier, "bbm" for the koala: ``engine.default_identifier``).
"""

