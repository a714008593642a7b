"""Names shared by the TensorBoard sink and the plugin: the plugin's name and the scalars' tag prefix."""

PLUGIN_NAME = "cockpit_lite"
SCALAR_PREFIX = "cockpit/"  # scalars go to TensorBoard's stock scalars as cockpit/<key>
