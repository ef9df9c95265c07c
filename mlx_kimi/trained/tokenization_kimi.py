# Stand-in for Moonshot's tokenization_kimi.py, so this tiny checkpoint has the real layout.
# kimi-cluster never imports or runs it: it reads tiktoken.model and tokenizer_config.json itself.
raise ImportError("tokenization_kimi.py of a kimi-cluster tiny checkpoint is a stand-in, not a tokenizer")
