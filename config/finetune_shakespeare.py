# fine-tune OpenAI's GPT-2 on Tiny Shakespeare (GPT-2's BPE):
#   python data/shakespeare/prepare.py && python train.py config/finetune_shakespeare.py
#   python sample.py --out_dir=out-shakespeare --start="ROMEO:" --num_samples=3 --max_new_tokens=200
# the 124M model fits a laptop GPU or a patient CPU; gpt2-xl (1.5B) writes much better verse on a big GPU

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
log_interval = 1

dataset = 'shakespeare'
init_from = 'gpt2'  # or gpt2-medium, gpt2-large, gpt2-xl, or a local Hugging Face GPT-2 folder

# only save checkpoints if the validation loss improves: a few hundred MB each
always_save_checkpoint = False

# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter;
# shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
batch_size = 1
gradient_accumulation_steps = 32
block_size = 1024
max_iters = 20

# fine-tune at a small constant learning rate
learning_rate = 3e-5
decay_lr = False
dropout = 0.0
