"""hpcdistill.models"""
