"""torchgraft.peft"""
