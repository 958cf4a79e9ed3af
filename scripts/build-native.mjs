// placeholder: replaced by the native addon build
