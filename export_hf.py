"""
Export a checkpoint as a Hugging Face model folder: config.json, model.safetensors and the tokenizer's files,
where its kind has them (char, bpe, tiktoken and hf do; word does not).

    python export_hf.py --out_dir=out-shakespeare --hf_dir=gpt2-shakespeare
    python -c "from transformers import pipeline; print(pipeline('text-generation', model='gpt2-shakespeare')('ROMEO:', do_sample=False))"

A GPT-2-architecture checkpoint becomes a GPT-2 folder (it loads back here with --init_from=gpt2-shakespeare);
one with the modern switches becomes the transformers family that has them (hf_architectures.py: Llama for rotary
positions, RMSNorm and SwiGLU, Qwen3 with QK-norm, VaultGemma with logit soft-capping, ...), and a combination no
family has is refused, naming what the nearest lacks. The folder loads with transformers.AutoModelForCausalLM and
can be pushed to the hub (huggingface-cli upload NAME gpt2-shakespeare). After writing, the folder is loaded with
transformers and its logits compared with ours.
"""
import json
import os

import torch
from safetensors import SafetensorError

from atomic_write import atomic_write_folder, remove_dead_temporaries
from checkpoint import CheckpointError, load_model
from configurator import configure, fail
from hf_gpt2 import HFError, export_model, quiet_transformers

# -----------------------------------------------------------------------------
out_dir = 'out'  # the checkpoint to export
hf_dir = ''  # the folder to write; '' is out_dir + '-hf'
verify = True  # load the written folder with transformers and check that it computes our logits
# -----------------------------------------------------------------------------
configure(globals())

hf_dir = hf_dir or os.path.normpath(out_dir) + '-hf'
if os.path.exists(hf_dir) and (not os.path.isdir(hf_dir) or os.listdir(hf_dir)):
    fail(f'{hf_dir} already exists and is not an empty folder: choose another --hf_dir or remove it')
try:
    model, tokenizer, _ = load_model(out_dir)
    parent = os.path.dirname(os.path.abspath(hf_dir))
    if os.path.isdir(parent):  # what an export killed midway left
        remove_dead_temporaries(parent, lambda name: name == os.path.basename(os.path.abspath(hf_dir)))
    # written whole beside hf_dir and renamed into place: a full disk leaves nothing that blocks the next export
    notes = atomic_write_folder(hf_dir, lambda folder: export_model(model.eval(), tokenizer, folder, out_dir))
except (CheckpointError, HFError) as e:
    fail(e)
except OSError as e:
    fail(f'cannot write {hf_dir}: {e.strerror}; free some space or pass an --hf_dir you can write to (nothing was written)')
except SafetensorError as e:  # safetensors' own error for a failed write (a full disk)
    fail(f'cannot write {hf_dir}: {e}; free some space or pass an --hf_dir you can write to (nothing was written)')
for note in notes:
    print(f'note: {note}')
with open(os.path.join(hf_dir, 'config.json'), encoding='utf-8') as f:
    architecture = json.load(f)['model_type']
print(f'wrote {hf_dir}, a {architecture} model: {", ".join(sorted(os.listdir(hf_dir)))}')

if verify:
    from transformers import AutoModelForCausalLM
    with quiet_transformers():
        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    vocab = hf_model.config.vocab_size
    idx = torch.randint(0, vocab, (2, min(64, model.config.block_size)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)[0][..., :vocab]
        theirs = hf_model(idx).logits
    diff = (ours - theirs).abs().max().item()
    if diff > 1e-4 * max(1.0, ours.abs().max().item()):
        fail(f'the exported model computes different logits (max difference {diff:.2e}): please report this')
    print(f'verified: transformers computes the same logits (max difference {diff:.1e})')
