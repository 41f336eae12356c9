"""What every vision-language model adapter shares: the prompt bookkeeping of vision methods (``prompt``,
``shrink``), the tower-output site (``tower``) and the language-model site (``decoder``). One package per VLM
family (``backbones/llava``, ...) wires them to its model."""
