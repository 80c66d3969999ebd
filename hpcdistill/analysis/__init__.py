"""hpcdistill.analysis"""
