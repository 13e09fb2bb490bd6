
def f():


a
b
b
b
    return 1
def f():
