"""shortcut"""
