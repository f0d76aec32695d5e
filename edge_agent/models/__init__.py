"""Models on the device.

The A/B model store (:mod:`.store`), the manager that installs signed releases
(:mod:`.manager`) and the client that downloads them from the server (:mod:`.download`).
"""
