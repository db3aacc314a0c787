# the character-level Shakespeare model for a CPU (a laptop, or 2 cores): nanoGPT's CPU quickstart
# shape (4 layers, 4 heads, 128 wide, context 64, batch 12, no dropout) at twice its learning rate,
# which reaches a lower val loss in the same 2000 steps; evaluations every 500 steps keep their cost small.
#   python data/shakespeare_char/prepare.py
#   python train.py config/shakespeare_char_cpu.py
#   python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:"

out_dir = 'out-shakespeare-char-cpu'
dataset = 'shakespeare_char'
eval_interval = 500
eval_iters = 20
log_interval = 100
always_save_checkpoint = False  # save when val loss improves

device = 'cpu'
compile = False  # compiling takes longer than this whole run

gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 2e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 50
