"""The cleaning prepare.py gives a corpus, in this order: wiki markup stripped (clean_wiki), HTML entities unescaped
(unescape_html), a Unicode normal form (normalize), whitespace normalised (normalize_whitespace). prepare.py records
the options it used in meta.json ('cleaning'), so that eval.py can clean a text the same way before scoring it: a
model is scored on text as its corpus was, not on characters its corpus never kept."""
import ast
import html
import re

from dataset import normalize_unicode

# the options clean() takes, as meta.json's 'cleaning' records them; dataset.load_meta checks their types
CLEANING_OPTIONS = ('clean_wiki', 'unescape_html', 'normalize', 'normalize_whitespace')
# what a dataset that recorded no cleaning gets (data/*/prepare.py, prepare_chat.py): NFC only, as before
NFC_ONLY = dict(clean_wiki=False, unescape_html=False, normalize='NFC', normalize_whitespace=False)


_WIKI40B_MARKER = re.compile(r'\s*_START_(?:ARTICLE|SECTION|PARAGRAPH)_\s*')
_WIKI_MARKUP = [  # (pattern, replacement), applied in order
    (re.compile(r'<!--.*?-->', re.S), ''),  # comments
    (re.compile(r'<ref[^<>]*/>|<ref[^<>]*>.*?</ref>', re.S | re.I), ''),  # footnotes
    (re.compile(r'\{\|.*?\|\}', re.S), ''),  # tables
    (re.compile(r'\[\[([^\[\]|:]*\|)?([^\[\]:]*)\]\]'), r'\2'),  # [[target|label]] and [[target]] -> the text shown
    (re.compile(r'\[\[[^\[\]]*\]\]'), ''),  # [[File:...]], [[Category:...]], interwiki links
    (re.compile(r'\[(?:https?:)?//[^\s\]]+ ?([^\]]*)\]'), r'\1'),  # [http://url label] -> label
    (re.compile(r"'{2,}"), ''),  # ''italic'', '''bold'''
    (re.compile(r'^=+[^\S\n]*(.*?)[^\S\n]*=+[^\S\n]*$', re.M), r'\1'),  # == Heading == -> Heading
    (re.compile(r'</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>'), ''),  # other HTML tags: <br>, <small>, </sup>
    (re.compile(r'__[A-Z]+__'), ''),  # magic words: __TOC__, __NOTOC__
]
_WIKI_TEMPLATE = re.compile(r'\{\{[^{}]*\}\}')  # innermost {{template}}: removed until none is left
_WIKI_SIGNS = ('[[', '{{', "''", '<', '==', '{|', '__', '[http', '[//')


def strip_wiki(text):
    """Wikipedia text as plain text: wiki40b's layout markers become blank lines and newlines, and
    leftover wiki markup is removed, keeping the text a reader sees (a link's label, a heading's title)."""
    if text.startswith(("b'", 'b"')):  # copies of wiki40b that store each article as a bytes literal
        try:
            text = ast.literal_eval(text).decode('utf-8')
        except (ValueError, SyntaxError, UnicodeDecodeError):
            pass
    if '_START_' in text or '_NEWLINE_' in text:
        text = _WIKI40B_MARKER.sub('\n\n', text).replace('_NEWLINE_', '\n')
    if any(sign in text for sign in _WIKI_SIGNS):
        for _ in range(10):  # nested templates, inside out
            text, n = _WIKI_TEMPLATE.subn('', text)
            if not n:
                break
        for pattern, replacement in _WIKI_MARKUP:
            text = pattern.sub(replacement, text)
    return text


_ODD_SPACE = re.compile(r'[^\S\n ]')  # whitespace other than ' ' and '\n': tabs, '\r', no-break spaces, ...
_BLANK_LINES = re.compile(r'\n{3,}')


def normalize_spaces(text):
    """Runs of spaces, tabs and other Unicode spaces become one space; lines lose leading and trailing
    spaces; two or more blank lines in a row become one; the text loses leading and trailing whitespace.
    Cheap checks first: most documents of a clean corpus need no change, and skip the slow part."""
    if '  ' in text or ' \n' in text or '\n ' in text or _ODD_SPACE.search(text):
        text = '\n'.join([' '.join(line.split()) for line in text.split('\n')])
    if '\n\n\n' in text:
        text = _BLANK_LINES.sub('\n\n', text)
    return text.strip()


def clean(text, options):
    """text cleaned with options (a dict holding CLEANING_OPTIONS), as prepare.py cleans each document."""
    if options['clean_wiki']:
        text = strip_wiki(text)
    if options['unescape_html'] and '&' in text:
        text = html.unescape(text)
    text = normalize_unicode(text, options.get('normalize', ''))
    if options['normalize_whitespace']:
        text = normalize_spaces(text)
    return text
