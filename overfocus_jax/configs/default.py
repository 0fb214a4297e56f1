r"""Default run: the seeds' pre-activation residual CNN on mnist5k (4,000 real MNIST digits, 1,000 held out).

    overfocus train --workdir runs/default

Reaches 97.8% test accuracy on the 1,000 held-out digits in 10 epochs, 1 min 32 s on 2 CPU cores (README.md). Every field below can be overridden with --config.FIELD=VALUE.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data: mnist5k | digits | tfds:NAME | idx:DIR | npz:FILE | imagefolder:DIR[:SIZE][:domains] (data/imagefolder.py) |
  # your own loader by import path (my_pkg.data:load, called with no arguments, returning an ImageDataset:
  # overfocus_jax.data.sources.dataset_from_arrays builds one).
  config.dataset = "mnist5k"
  config.data_dir = ""  # a prepared TFDS directory, for tfds:NAME ("" = TFDS's default)
  config.skip_bad_images = False  # imagefolder: leave out unreadable/non-image files and count them (else an error)
  config.image_size = 0  # imagefolder: the side images are resized and centre-cropped to (0: the spec's :SIZE, or 64)
  config.augment = True  # random crop with padding; horizontal flip only for natural images
  # Which augmentation (data/augmentation.py): crop pad (a shift by up to an eighth of the side, zero fill) |
  # resized (torchvision's RandomResizedCrop: scale, ratio), for natural images; colour jitter j: brightness,
  # contrast and saturation each × U(1 − j, 1 + j) (0: off). The mirror stays on for natural images only.
  config.augmentation = ml_collections.ConfigDict(dict(
      crop="pad",
      scale=(0.08, 1.0),     # resized: the box's share of the image's area
      ratio=(0.75, 4 / 3),   # resized: the box's aspect (width / height)
      color_jitter=0.0,
  ))

  # Model: resnet (the seeds' pre-activation residual CNN) | resnet18 | attention | focus | corner | vgg16 |
  # mnist_cnn (DomainBed's MNIST_CNN, models/mnist_cnn.py: no options) | convnext.
  config.model = "resnet"
  # A model of your own by import path (--config.model=my_pkg.nets:TinyNet): called as
  # factory(num_classes=N, **model_args); --config.model_args.NAME=VALUE adds an argument.
  config.model_args = ml_collections.ConfigDict()
  config.resnet = ml_collections.ConfigDict(dict(
      stem_features=16,
      stage_widths=(32, 64, 128),
      stage_sizes=(1, 1, 1),
      stage_strides=(1, 2, 2),
      stem_kernel=3,
      stem_strides=1,
      stem_pool="none",  # none | max | avg
      activation="relu",  # relu | gelu (exact) — resnet and resnet18
      norm="batch",       # batch | group (GroupNorm: at most 32 groups of at least 4 channels) | none
  ))
  # VGG-16 (models/vgg.py): conv3×3 layers 64-64-M-128-128-M-256×3-M-512×3-M-512×3-M, z = the last block's map.
  config.vgg = ml_collections.ConfigDict(dict(
      batch_norm=True,  # BN after every conv (torchvision's vgg16_bn) | False: the paper's (lower learning_rate)
      width=1.0,        # multiplies every conv's width: 0.25 gives 16-…-128, for small images and CPUs
      max_pools="auto",  # the first N blocks end in a 2×2 max-pool (5: the paper) | auto: as many as keep z at
                         # least 3×3 on the data's images (224×224: 5, 28×28: 3, 8×8: 1)
      head="gap",       # gap: global average pool → dense | classic: adaptive pool → 4096-4096 MLP → dense (paper)
      hidden=4096,      # the classic head's two hidden layers
      head_pool=7,      # the classic head's adaptive average pool: head_pool × head_pool bins (torchvision: 7)
  ))
  # ConvNeXt (models/convnext.py): timm's convnext_<size>; dwconv7×7 → LayerNorm → MLP 4× → layer scale blocks,
  # z = the last stage's map. The ImageNet stem (4×4, stride 4) is timm's; 28×28 images want the small one.
  config.convnext = ml_collections.ConfigDict(dict(
      size="atto",             # atto | femto | pico | nano | tiny
      stem="imagenet",         # imagenet: 4×4 stride 4 (28 → 7 → 4 → 2 → 1) | small: 2×2 stride 2 (28 → … → 2) |
                               # pixel: 1×1 (28 → … → 4)
      width=1.0,               # multiplies every stage's width (not timm's model unless 1)
      drop_path_rate=0.0,      # stochastic depth at the last block, linear from 0 (training only)
      layer_scale_init=1e-6,   # γ's initial value
      head_init_scale=1.0,     # the classifier's initial kernel times this (timm's head_init_scale)
  ))
  # resnet18_tv | resnet50_tv (models/resnet_tv.py): torchvision's resnet18/resnet50 (post-activation, v1.5),
  # z = layer4's map; its layer names, so torchvision's weights load (init_from below).
  config.resnet_tv = ml_collections.ConfigDict(dict(
      stem="cifar",              # cifar: conv3×3/1, no pool (28×28 → z 4×4) | imagenet: conv7×7/2 + max-pool 3×3/2
                                 # (torchvision's, for 224×224 images and its weights; 28×28 → z 1×1)
      zero_init_residual="auto",  # true: each block's last BN scale starts at 0, every block the identity
                                  # (torchvision's option) | false: torchvision's default | auto: on for resnet50_tv
                                  # (from scratch it diverged without it), off for resnet18_tv (torchvision's
                                  # default; it gained nothing from it): README, "Models". Loaded weights
                                  # (init_from) replace these scales, so it only matters from scratch.
  ))
  # Pretrained weights (models/weights.py): a .safetensors state dict, mapped onto the model when a run starts (a
  # resumed run restores its checkpoint instead); pickles (.pth) are never read. The head is re-initialised when the
  # class count differs.
  config.init_from = ""                    # a .safetensors file ("" = none)
  config.init_from_layout = "torchvision"  # torchvision | timm: whose tensor names the file has
  config.normalization = "auto"  # auto: ImageNet's mean/std when init_from is set (what such weights expect), else
                                 # the dataset's own | dataset | imagenet (data/sources.py: normalized_as)
  # Learn to Pay Attention (models/attention.py): conv3×3-BN-ReLU layers numbered from 1, a 2×2 max-pool after
  # the layers in pool_after, attention on the listed layers' maps against a global feature of width
  # global_features; z = the first attention layer's map.
  config.attention = ml_collections.ConfigDict(dict(
      widths=(16, 32, 32, 64, 64, 128),
      pool_after=(1, 3, 5),      # 28×28 → 14 → 7 → 3; 8×8 → 4 → 2 → 1
      attention_layers=(3, 5),   # the 14×14 and 7×7 maps of MNIST
      global_features=128,
      compatibility="pc",      # pc: ⟨u, l + g⟩ | dp: ⟨l, g⟩
      normalisation="softmax",  # softmax over positions | sigmoid per position
  ))
  # Focus models (models/focus.py): K patches of P×P samples, each spanning patch_scale of the image's side,
  # at keypoints learned by a small CNN (focus) or found by Harris (corner, which also reads this group).
  config.focus = ml_collections.ConfigDict(dict(
      num_keypoints=4,
      patch_size=12,
      patch_scale=0.43,          # 12/28: the patch samples MNIST at its own resolution
      keypoint_widths=(8, 16),   # the keypoint CNN's stride-2 conv layers (focus only)
      keypoint_grad_scale=0.01,  # the keypoint CNN learns this much slower (focus only)
      zoom=False,                # focus only: also learn each patch's scale, within zoom_range (seed 001's
      zoom_range=(0.2, 0.8),     # "focus sizing"); patch_scale is where it starts, inside the range
      patch_widths=(16, 32),     # the shared patch encoder's conv layers
      feature_width=64,          # D: one feature vector per patch
      hidden=128,                # the head's hidden layer (0: none)
  ))
  config.corner = ml_collections.ConfigDict(dict(
      harris_k=0.05,     # R = det(M) − k·trace(M)²
      sigma=1.0,         # Gaussian window of the structure tensor M
      nms_radius=2,      # keep only maxima of their (2r+1)² window
      border=2,          # ignore corners this close to the edge
  ))

  # Regularizer applied to the latent map z = encode(x) inside the train step: none | sgdrop | rsc | rsc_domainbed |
  # your own by import path (my_pkg.reg:make, called as make(**args) and returning an overfocus_jax.Regularizer).
  config.regularizer = ml_collections.ConfigDict(dict(
      name="none",
      args=dict(),  # --config.regularizer.args.NAME=VALUE: the keyword arguments of a regularizer given by import path
      sgdrop=dict(
          # The default departs from the paper (quantile, ρ = 0.1 of the elements, whole batch), which collapses
          # training on this model: see challenge/sgdrop.py and experiments/README.md for the evidence.
          rule="mass",             # mass: the fewest units holding `mass` of A | topk: exactly ⌈ρN⌉ units |
                                   # quantile: 1[A ≤ quantile(A, 1 − ρ)], the paper's formula as written
          rate=0.5,                # quantile, topk: ρ, the share of units dropped, in [0, 1) | mass: the cap, in (0, 1)
          mass=0.5,                # m: the share of each sample's positive attribution the mass rule drops, (0, 1]
          ramp_epochs=1.0,         # > 0: grow the drop (ρ's count or m) linearly from 0 over this many epochs
          granularity="spatial",   # spatial (positions) | element | channel
          target="true",           # attribute the true class or the predicted one
          rescale=False,           # multiply the kept units by 1/(1-ρ) (topk) or N/kept (the others, ramps)
          batch_fraction=0.5,      # share of each batch that is masked (the rest trains on the whole map)
          ema_decay=0.0,           # > 0: attribution from an EMA teacher with this decay (the paper's Fig. 2)
      ),
      rsc=dict(
          spatial_fraction=1 / 3,  # share of positions dropped in spatial mode
          channel_fraction=1 / 3.2,  # share of channels dropped in channel mode
          spatial_probability=0.5,   # chance of spatial mode at each step
          batch_percent=-1.0,        # share of the batch masked; < 0 follows the 0.3 + 0.2·⌊epoch/10⌋ curriculum
          rule="reference",          # reference: the official code's thresholds and ties | topk: exactly ⌈f·N⌉ units
      ),
      rsc_domainbed=dict(
          feature_drop=1 / 3,      # f: share of pooled features dropped per sample
          batch_drop=1 / 3,        # b: share of the batch masked
          rule="reference",        # reference: DomainBed's np.percentile counts and ties | topk: exactly ⌈f·N⌉
      ),
  ))

  # Environments (colored_mnist, rotated_mnist, imagefolder:DIR:domains), as DomainBed trains on them
  # (data/balanced.py); every evaluation also logs each environment's env{i}_in_acc and env{i}_out_acc.
  config.environments = ml_collections.ConfigDict(dict(
      test_envs=(),    # held out, never trained on; test_accuracy is then their in-split accuracy (DomainBed's)
      train_envs=(),   # the environments trained on; () = every one not held out
      balanced=True,   # each batch: batch_size / E examples of each of the E training environments
      trial_seed=0,    # seeds each environment's 80/20 in/out split (DomainBed's --trial_seed)
  ))
  # The loss over a batch (challenge/invariance.py): erm (the mean) | irm | vrex — penalties over the training
  # environments' risks (balanced batches); λ from step anneal_steps on (1 before), the optimizer restarted there.
  config.objective = ml_collections.ConfigDict(dict(
      name="erm",
      irm=dict(penalty_weight=100.0, anneal_steps=500),   # DomainBed's defaults
      vrex=dict(penalty_weight=10.0, anneal_steps=500),
  ))

  # Optimisation.
  config.num_epochs = 10
  config.batch_size = 128
  config.eval_batch_size = 256  # divisible by 8 devices; the last batch is padded
  config.optimizer = "sgd"  # sgd (with momentum) | adam | adamw
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.schedule = "cosine"  # cosine | step | constant
  config.warmup_epochs = 1
  config.step_decay_epochs = (30, 60)  # for schedule=step
  config.step_decay_factor = 0.1
  config.label_smoothing = 0.0
  config.freeze_backbone = False  # train the head only: the encoder's updates are zero (its BN statistics still move)
  config.backbone_lr_scale = 1.0  # the encoder's learning rate = learning_rate × this (fine-tuning: e.g. 0.1)

  # Where the data lives and how often the host talks to the devices (overfocus_jax/train/streams.py, dispatch.py).
  config.data_on_device = "auto"    # auto: on when the data fits an accelerator, on a CPU for resnet and vgg16
                                    # (data/on_device.py: CPU_MODELS) | on | off (grain)
  config.data_workers = 0           # off: grain worker processes that read and augment (0: threads of this process)
  config.steps_per_dispatch = 0     # K: train steps per compiled call (one host sync each), at most an epoch;
                                    # 0: 1 on CPUs (XLA:CPU loops are slow, train/dispatch.py), 20 on accelerators

  # Numerics and platform.
  config.batch_norm = "global"      # global: statistics over the whole batch, across devices (as on one device) |
                                    # local: each device's own rows, one all-reduce per step (train/step.py)
  config.dtype = "float32"          # float32 | bfloat16: activations and convolutions (parameters stay float32)
  config.platform_tuning = "auto"   # auto: the measured CPU-only speed-ups on one CPU device, oneDNN's convolutions
                                    # among them | xla: the same with XLA's convolutions | off: plain XLA
                                    # (overfocus_jax/platform_tuning.py; same maths either way)

  # Bookkeeping.
  config.seed = 0
  config.keep_checkpoints = 3           # the newest N checkpoints stay (epoch ends and those in between)
  config.checkpoint_every_steps = 0     # also save every N steps inside an epoch (0: off; train/preemption.py)
  config.checkpoint_every_minutes = 30.0  # and every N minutes (0: off), so a preempted job loses at most that
  return config
