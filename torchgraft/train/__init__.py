"""torchgraft.train"""
