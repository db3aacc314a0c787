# Portuguese Wikipedia (wiki40b 'pt' on the Hugging Face hub) with a byte-level BPE of 32,768 tokens
# trained on it here. The dataset downloads to the Hugging Face cache on first use.
#   python prepare.py config/prepare_pt_wiki_bpe.py
#   python train.py config/train_pt_wiki_bpe.py
# The same from a local dump (paragraphs separated by blank lines, wiki markup is removed):
#   python prepare.py config/prepare_pt_wiki_bpe.py --hf_dataset= --input=ptwiki.txt

hf_dataset = 'google/wiki40b'
hf_config = 'pt'
hf_split = 'train'
clean_wiki = True  # wiki40b's _START_..._ markers, or markup left in a local dump
unescape_html = True
normalize_whitespace = True
min_chars = 200  # stubs: a title and a line or two
val_fraction = 0.005

tokenizer = 'bpe'
vocab_size = 32768  # fits uint16
tokenizer_train_mb = 300.0  # a sample of this size gives the same merges; all of it would take far longer

out_dir = 'data/pt_wiki_bpe'
