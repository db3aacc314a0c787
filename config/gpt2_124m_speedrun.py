# GPT-2 (124M) on OpenWebText with modded-nanogpt's architecture and the Muon optimizer, tuned for throughput on
# H100s: block 1024, bf16 autocast, torch.compile, flash attention (PyTorch's scaled_dot_product_attention picks
# it for bf16 causal attention). Target: MFU >= 50% on an H100.
# UNMEASURED: no GPU was available when this recipe was written. Measure throughput and MFU with
#   python bench.py config/gpt2_124m_speedrun.py --steps=30 --eval_interval=1000 --log_interval=1
# and compare with plain GPT-2 (train.py's defaults) in the same run:
#   python bench.py config/gpt2_124m_speedrun.py --steps=30 --eval_interval=1000 --vs --optimizer=adamw --position=learned --activation=gelu --norm=layernorm --qk_norm=False --tie_weights=True --zero_init_proj=False --logit_softcap=0.0
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m_speedrun.py
out_dir = 'out-gpt2-124m-speedrun'
dataset = 'openwebtext'  # python data/openwebtext/prepare.py
wandb_run_name = 'gpt2-124m-speedrun'

# 16 sequences of 1024 per micro-step fill an H100 well (bigger ones gain little and the float32 logits of a
# 50k vocabulary grow fast); 32 micro-steps over all GPUs make modded-nanogpt's 512K tokens per step
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32

# GPT-2 small's shape
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

# modded-nanogpt's architecture (records of Oct-Nov 2024)
position = 'rotary'
norm = 'rmsnorm'
qk_norm = True
activation = 'relu2'
tie_weights = False
zero_init_proj = True
logit_softcap = 30.0

# Muon for the blocks' matrices, AdamW for embeddings, head and gains (modded-nanogpt: Muon lr 0.05 with this
# update scaling; 0.02 is the safer start without its other tricks)
optimizer = 'muon'
muon_lr = 0.02
learning_rate = 3e-3
weight_decay = 0.0
max_iters = 6000  # ~3.1B tokens; modded-nanogpt reached 3.28 FineWeb val loss in ~3000 steps of this size
lr_decay_iters = 6000
warmup_iters = 100
min_lr = 3e-5

eval_interval = 250
eval_iters = 100
log_interval = 10
dtype = 'bfloat16'
compile = True
