"""torchgraft.nn"""
