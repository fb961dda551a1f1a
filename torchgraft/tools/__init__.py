"""torchgraft.tools"""
