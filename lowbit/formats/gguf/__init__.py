"""GGUF export: tensor naming (convert), block encoders (legacy 32-weight types, k-quants) and the file writer."""
