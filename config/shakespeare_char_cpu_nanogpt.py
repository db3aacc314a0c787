# nanoGPT's own CPU quickstart, as its README gives it, for side-by-side comparisons:
#   python bench.py config/shakespeare_char_cpu.py --vs config/shakespeare_char_cpu_nanogpt.py
# GPT-2 architecture with AdamW, 4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 steps

out_dir = 'out-shakespeare-char-cpu-nanogpt'
dataset = 'shakespeare_char'
eval_interval = 250
eval_iters = 20
log_interval = 1
always_save_checkpoint = False

device = 'cpu'
compile = False

gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
