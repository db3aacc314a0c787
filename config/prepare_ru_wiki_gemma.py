# Russian Wikipedia (wiki40b 'ru' on the Hugging Face hub) tokenised with Gemma 3's tokenizer: 262,144
# tokens, so the ids are stored as uint32. The dataset downloads to the Hugging Face cache on first use.
#   python prepare.py config/prepare_ru_wiki_gemma.py
#   python train.py config/train_ru_wiki_gemma.py
# Gemma is gated on the hub: accept its licence at https://huggingface.co/google/gemma-3-270m and log in
# once (`hf auth login`), or use a copy: --tokenizer_name=FOLDER (with --gguf_file=NAME for a .gguf file).

hf_dataset = 'google/wiki40b'
hf_config = 'ru'
hf_split = 'train'
clean_wiki = True  # wiki40b marks titles, sections and paragraphs with _START_..._ markers
unescape_html = True
normalize_whitespace = True
min_chars = 200  # stubs: a title and a line or two
val_fraction = 0.005

tokenizer = 'hf'
tokenizer_name = 'google/gemma-3-270m'

out_dir = 'data/ru_wiki_gemma'
