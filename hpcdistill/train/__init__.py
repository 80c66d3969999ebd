"""hpcdistill.train"""
