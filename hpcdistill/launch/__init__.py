"""hpcdistill.launch"""
