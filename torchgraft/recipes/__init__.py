"""torchgraft.recipes"""
