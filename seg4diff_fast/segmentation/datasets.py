"""Readers for segmentation datasets in their standard folder layouts.

Every reader yields :class:`Sample` (id, image path, label path) and maps the stored label values to
``0..C-1`` with 255 ignored (ADE-847 and Pascal Context 459, with more than 255 classes, keep their own ignore value:
:attr:`SegDataset.ignore_index`):

- ``voc20`` (the paper's VOC20): ``VOCdevkit/VOC2012`` or the folder holding ``JPEGImages``,
  ``SegmentationClass``, ``ImageSets/Segmentation/{split}.txt``; background (0) and borders (255) ignored,
  classes 1..20 -> 0..19.
- ``voc21``: the same with background kept, as the paper's ``voc21.json``: the 20 classes then ``background``
  (class 20). Both also read the paper's prepared layout (``annotations_detectron2/val`` for voc20,
  ``annotations_detectron2_bg/val`` for voc21, from its ``datasets/prepare_voc.py``) when it is there.
- ``ade150``: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and ``annotations/.../*.png``;
  0 ("other") ignored, 1..150 -> 0..149.
- ``voc20b`` (VOC with background names, CAT-Seg's PAS-20b): voc21's files and 21 scored classes, prompted with the
  paper's ``voc20b.json``: the 20 VOC names and 39 Pascal Context names, each of which scores as ``background``
  (class 20), as the paper's ``VOCbEvaluator`` folds predictions >= 20 into background. Under ``gt`` an image with
  background pixels prompts all 39 background names (:meth:`SegDataset.prompt_for`).
- ``ade847``: the paper's ``datasets/prepare_ade20k_full.py`` output, ``ADE20K_2021_17_01/images_detectron2/validation/
  *.jpg`` and ``annotations_detectron2/validation/*.tif`` (16-bit TIFF, ids 0..846 in ``ade847.json``'s order,
  65535 ignored: its registration's ``ignore_label``).
- ``context459``: the paper's ``datasets/prepare_pascal_context_459.py`` output, ``VOC2010/JPEGImages`` and
  ``annotations_detectron2/pc459_val/*.tif`` (16-bit TIFF of ``LabelMap - 1``: ids 0..458 in ``pc459.json``'s order;
  459 ignored, its registration's ``ignore_label``).
- ``context59``: detectron2's prepared Pascal Context 59 (``JPEGImages`` + ``annotations_detectron2/pc59_{split}``),
  labels already 0..58 with 255 ignored.
- ``context59_bg``: Pascal Context 59 with background (the paper's Table 2): ``annotations_detectron2_bg/pc59_{split}``,
  0 = background, 1..59 = the 59 classes, 255 ignored; classes ``["background"] + CONTEXT59_CLASSES``.
- ``coco_object`` (the paper's Table 1 COCO-Object): ``coco/val2017/*.jpg`` and either the prepared object maps
  ``coco/annotations_object/val2017/*.png`` (0 background, 1..80 objects, 255 ignored) or, derived on the fly,
  COCO-Stuff's detectron2 maps ``coco/annotations_detectron2/val2017`` (train ids 0..79 things -> 1..80, 80..170
  stuff -> 0 background). Classes: the paper's ``coco_object.json`` (``background`` first). As in the paper
  (ignore label 0 of its ``coco_2017_test_object_wo_bg`` set), ``background`` is prompted when present but its
  pixels are not scored (:attr:`SegDataset.unscored`).
- ``coco_object_bg`` (Table 2): the same files with background scored as class 0.
- ``coco_stuff27`` (Table 2): ``coco/val2017`` + ``coco/annotations_27_detectron2/val2017`` (0..26 in the order of the
  paper's ``coco_stuff_27.json``, 255 ignored); that folder is the paper's own preparation (its repository has no
  script for it), so it is read, not derived.
- ``cityscapes``: ``leftImg8bit/{split}/<city>/*_leftImg8bit.png`` and ``gtFine/{split}/<city>/*_gtFine_labelTrainIds.png``
  (made by cityscapesscripts' ``createTrainIdLabelImgs``), 19 classes, 255 ignored.
- ``folder``: any ``images/`` + ``labels/`` pair with the same stems and a ``classes.txt`` (one name a line, at most
  255, the line number its id: a blank line between names is refused), labels already 0..C-1 / 255 (e.g. a prepared
  COCO-Stuff). Images are the files of ``images/`` with an image ending (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``,
  ``.tif``, ``.tiff``, ``.webp``); two of one stem (``x.png`` and ``x.jpg``) and an image without its
  ``labels/<stem>.png`` are refused.

Text files (``classes.txt``, image lists) are read as users save them (UTF-8 with or without a byte-order mark,
CRLF: :func:`seg4diff_fast._io.read_lines`); images and labels through
:func:`seg4diff_fast.segmentation.images.read_image` (EXIF orientation applied, as to every image the package reads).

Class names are the paper's ``datasets/*.json`` lists (tests compare them with copies kept as test data); a name
is prompted as the paper's code prompts it (:func:`paper_prompt_name`: the part before the first ``-``), so that
numbers compare, except where that makes it another class's name (:func:`prompt_words`: ADE-847's ``post-it``,
Pascal Context 459's ``horse-drawncarriage``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .._io import read_lines
from .images import FRAME_SUFFIXES as IMAGE_SUFFIXES
from .images import images_by_stem, read_image
from .metrics import IGNORE_INDEX

__all__ = ["Sample", "SegDataset", "open_dataset", "paper_prompt_name", "prompt_words", "VOC20_CLASSES",
           "VOC21_CLASSES", "VOC20B_CLASSES", "ADE150_CLASSES", "ADE847_CLASSES", "CONTEXT59_CLASSES",
           "CONTEXT459_CLASSES", "CITYSCAPES_CLASSES", "COCO_OBJECT_CLASSES", "COCO_STUFF27_CLASSES", "DATASETS"]

# Every list below is data copied from the paper's code (cvlab-kaist/Seg4Diff, datasets/<name>.json, commit bb500ca):
# voc20.json, voc21.json, ade150.json (its "bed " carries a trailing space, dropped here: the tokenizer drops it
# too), pc59.json, cityscapes.json, coco_object.json, coco_stuff_27.json.

VOC20_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
                 "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]

ADE150_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book",
    "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag"]

CONTEXT59_CLASSES = [
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building", "bus",
    "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door", "fence",
    "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow",
    "sofa", "diningtable", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood"]

CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle"]

# voc21.json: background LAST (id 20), as the paper's prepared annotations_detectron2_bg maps it
VOC21_CLASSES = VOC20_CLASSES + ["background"]

COCO_OBJECT_CLASSES = [
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]

COCO_STUFF27_CLASSES = [
    "electronic-things", "appliance-things", "food-things", "furniture-things", "indoor-things", "kitchen-things",
    "accessory-things", "animal-things", "outdoor-things", "person-things", "sports-things", "vehicle-things",
    "ceiling-stuff", "rawmaterial-stuff", "plant-stuff", "ground-stuff", "structural-stuff", "textile-stuff",
    "sky-stuff", "water-stuff", "solid-stuff", "building-stuff", "furniture-stuff", "mirror-stuff", "window-stuff",
    "wall-stuff", "food-stuff"]

# ade847.json, pc459.json (the Pascal Context 459 names, as its labels.txt without spaces) and voc20b.json (the
# 20 VOC classes, then 39 Pascal Context names that stand for VOC's background): data, as the lists above
ADE847_CLASSES = [
    "wall", "building, edifice", "sky", "tree", "road, route", "floor, flooring", "ceiling", "bed",
    "sidewalk, pavement", "earth, ground", "cabinet", "person, individual, someone, somebody, mortal, soul", "grass",
    "windowpane, window", "car, auto, automobile, machine, motorcar", "mountain, mount", "plant, flora, plant life",
    "table", "chair", "curtain, drape, drapery, mantle, pall", "door", "sofa, couch, lounge", "sea",
    "painting, picture", "water", "mirror", "house", "rug, carpet, carpeting", "shelf", "armchair", "fence, fencing",
    "field", "lamp", "rock, stone", "seat", "river", "desk", "bathtub, bathing tub, bath, tub", "railing, rail",
    "signboard, sign", "cushion", "path", "work surface", "stairs, steps", "column, pillar", "sink",
    "wardrobe, closet, press", "snow", "refrigerator, icebox", "base, pedestal, stand", "bridge, span", "blind, screen",
    "runway", "cliff, drop, drop-off", "sand", "fireplace, hearth, open fireplace", "pillow", "screen door, screen",
    "toilet, can, commode, crapper, pot, potty, stool, throne", "skyscraper", "grandstand, covered stand", "box",
    "pool table, billiard table, snooker table", "palm, palm tree", "double door", "coffee table, cocktail table",
    "counter", "countertop", "chest of drawers, chest, bureau, dresser", "kitchen island", "boat", "waterfall, falls",
    "stove, kitchen stove, range, kitchen range, cooking stove", "flower", "bookcase", "controls", "book",
    "stairway, staircase", "streetlight, street lamp",
    "computer, computing machine, computing device, data processor, electronic computer, information processing system",
    "bus, autobus, coach, charabanc, double-decker, jitney, motorbus, motorcoach, omnibus, passenger vehicle",
    "swivel chair", "light, light source", "bench", "case, display case, showcase, vitrine", "towel", "fountain",
    "embankment",
    "television receiver, television, television set, tv, tv set, idiot box, boob tube, telly, goggle box", "van",
    "hill", "awning, sunshade, sunblind", "poster, posting, placard, notice, bill, card", "truck, motortruck",
    "airplane, aeroplane, plane", "pole", "tower", "court", "ball",
    "aircraft carrier, carrier, flattop, attack aircraft carrier", "buffet, counter, sideboard",
    "hovel, hut, hutch, shack, shanty", "apparel, wearing apparel, dress, clothes", "minibike, motorbike",
    "animal, animate being, beast, brute, creature, fauna", "chandelier, pendant, pendent", "step, stair",
    "booth, cubicle, stall, kiosk", "bicycle, bike, wheel, cycle", "doorframe, doorcase", "sconce", "pond",
    "trade name, brand name, brand, marque", "bannister, banister, balustrade, balusters, handrail", "bag",
    "traffic light, traffic signal, stoplight", "gazebo", "escalator, moving staircase, moving stairway",
    "land, ground, soil", "board, plank", "arcade machine", "eiderdown, duvet, continental quilt", "bar",
    "stall, stand, sales booth", "playground", "ship", "ottoman, pouf, pouffe, puff, hassock",
    "ashcan, trash can, garbage can, wastebin, ash bin, ash-bin, ashbin, dustbin, trash barrel, trash bin", "bottle",
    "cradle", "pot, flowerpot", "conveyer belt, conveyor belt, conveyer, conveyor, transporter",
    "train, railroad train", "stool", "lake", "tank, storage tank", "ice, water ice", "basket, handbasket", "manhole",
    "tent, collapsible shelter", "canopy", "microwave, microwave oven", "barrel, cask", "dirt track", "beam",
    "dishwasher, dish washer, dishwashing machine", "plate", "screen, crt screen", "ruins",
    "washer, automatic washer, washing machine", "blanket, cover", "plaything, toy", "food, solid food",
    "screen, silver screen, projection screen", "oven", "stage", "beacon, lighthouse, beacon light, pharos", "umbrella",
    "sculpture", "aqueduct", "container", "scaffolding, staging", "hood, exhaust hood", "curb, curbing, kerb",
    "roller coaster", "horse, equus caballus", "catwalk", "glass, drinking glass", "vase", "central reservation",
    "carousel", "radiator", "closet", "machine", "pier, wharf, wharfage, dock", "fan", "inflatable bounce game",
    "pitch", "paper", "arcade, colonnade", "hot tub", "helicopter", "tray", "partition, divider", "vineyard", "bowl",
    "bullring", "flag", "pot", "footbridge, overcrossing, pedestrian bridge", "shower",
    "bag, traveling bag, travelling bag, grip, suitcase", "bulletin board, notice board", "confessional booth",
    "trunk, tree trunk, bole", "forest", "elevator door", "laptop, laptop computer", "instrument panel", "bucket, pail",
    "tapestry, tapis", "platform", "jacket", "gate", "monitor, monitoring device",
    "telephone booth, phone booth, call box, telephone box, telephone kiosk", "spotlight, spot", "ring",
    "control panel", "blackboard, chalkboard", "air conditioner, air conditioning", "chest", "clock", "sand dune",
    "pipe, pipage, piping", "vault", "table football", "cannon", "swimming pool, swimming bath, natatorium",
    "fluorescent, fluorescent fixture", "statue",
    "loudspeaker, speaker, speaker unit, loudspeaker system, speaker system", "exhibitor", "ladder", "carport", "dam",
    "pulpit", "skylight, fanlight", "water tower", "grill, grille, grillwork", "display board",
    "pane, pane of glass, window glass", "rubbish, trash, scrap", "ice rink", "fruit", "patio", "vending machine",
    "telephone, phone, telephone set", "net", "backpack, back pack, knapsack, packsack, rucksack, haversack", "jar",
    "track", "magazine", "shutter", "roof", "banner, streamer", "landfill", "post", "altarpiece, reredos",
    "hat, chapeau, lid", "arch, archway", "table game", "bag, handbag, pocketbook, purse",
    "document, written document, papers", "dome", "pier", "shanties", "forecourt", "crane",
    "dog, domestic dog, canis familiaris", "piano, pianoforte, forte-piano", "drawing", "cabin",
    "ad, advertisement, advertizement, advertising, advertizing, advert", "amphitheater, amphitheatre, coliseum",
    "monument", "henhouse", "cockpit", "heater, warmer", "windmill, aerogenerator, wind generator", "pool",
    "elevator, lift", "decoration, ornament, ornamentation", "labyrinth", "text, textual matter", "printer",
    "mezzanine, first balcony", "mattress", "straw", "stalls", "patio, terrace", "billboard, hoarding", "bus stop",
    "trouser, pant", "console table, console", "rack", "notebook", "shrine", "pantry", "cart", "steam shovel", "porch",
    "postbox, mailbox, letter box", "figurine, statuette", "recycling bin", "folding screen", "telescope",
    "deck chair, beach chair", "kennel", "coffee maker", "altar, communion table, lord's table", "fish", "easel",
    "artificial golf green", "iceberg", "candlestick, candle holder", "shower stall, shower bath", "television stand",
    "wall socket, wall plug, electric outlet, electrical outlet, outlet, electric receptacle", "skeleton",
    "grand piano, grand", "candy, confect", "grille door", "pedestal, plinth, footstall", "jersey, t-shirt, tee shirt",
    "shoe", "gravestone, headstone, tombstone", "shanty", "structure", "rocking chair, rocker", "bird", "place mat",
    "tomb", "big top", "gas pump, gasoline pump, petrol pump, island dispenser", "lockers", "cage", "finger",
    "bleachers", "ferris wheel", "hairdresser chair", "mat", "stands", "aquarium, fish tank, marine museum",
    "streetcar, tram, tramcar, trolley, trolley car", "napkin, table napkin, serviette", "dummy",
    "booklet, brochure, folder, leaflet, pamphlet", "sand trap", "shop, store", "table cloth", "service station",
    "coffin", "drawer", "cages", "slot machine, coin machine", "balcony", "volleyball court", "table tennis",
    "control table", "shirt", "merchandise, ware, product", "railway", "parterre", "chimney", "can, tin, tin can",
    "tanks", "fabric, cloth, material, textile", "alga, algae", "system", "map", "greenhouse", "mug", "barbecue",
    "trailer", "toilet tissue, toilet paper, bathroom tissue", "organ", "dishrag, dishcloth", "island", "keyboard",
    "trench", "basket, basketball hoop, hoop", "steering wheel, wheel", "pitcher, ewer", "goal",
    "bread, breadstuff, staff of life", "beds", "wood", "file cabinet", "newspaper, paper", "motorboat", "rope",
    "guitar", "rubble", "scarf", "barrels", "cap", "leaves", "control tower", "dashboard", "bandstand", "lectern",
    "switch, electric switch, electrical switch", "baseboard, mopboard, skirting board", "shower room", "smoke",
    "faucet, spigot", "bulldozer", "saucepan", "shops", "meter", "crevasse", "gear", "candelabrum, candelabra",
    "sofa bed", "tunnel", "pallet", "wire, conducting wire", "kettle, boiler", "bidet",
    "baby buggy, baby carriage, carriage, perambulator, pram, stroller, go-cart, pushchair, pusher", "music stand",
    "pipe, tube", "cup", "parking meter", "ice hockey rink", "shelter", "weeds", "temple", "patty, cake", "ski slope",
    "panel", "wallet", "wheel", "towel rack, towel horse", "roundabout", "canister, cannister, tin", "rod",
    "soap dispenser", "bell", "canvas", "box office, ticket office, ticket booth", "teacup", "trellis", "workbench",
    "valley, vale", "toaster", "knife", "podium", "ramp", "tumble dryer", "fireplug, fire hydrant, plug",
    "gym shoe, sneaker, tennis shoe", "lab bench", "equipment", "rocky formation", "plastic", "calendar", "caravan",
    "check-in-desk", "ticket counter", "brush", "mill", "covered bridge", "bowling alley", "hanger", "excavator",
    "trestle", "revolving door", "blast furnace", "scale, weighing machine", "projector", "soap", "locker", "tractor",
    "stretcher", "frame", "grating", "alembic", "candle, taper, wax light", "barrier", "cardboard", "cave", "puddle",
    "tarp", "price tag", "watchtower", "meters",
    "light bulb, lightbulb, bulb, incandescent lamp, electric light, electric-light bulb", "tracks", "hair dryer",
    "skirt", "viaduct", "paper towel", "coat", "sheet", "fire extinguisher, extinguisher, asphyxiator", "water wheel",
    "pottery, clayware", "magazine rack", "teapot", "microphone, mike", "support", "forklift", "canyon",
    "cash register, register", "leaf, leafage, foliage", "remote control, remote", "soap dish",
    "windshield, windscreen", "cat", "cue, cue stick, pool cue, pool stick", "vent, venthole, vent-hole, blowhole",
    "videos", "shovel", "eaves", "antenna, aerial, transmitting aerial", "shipyard", "hen, biddy", "traffic cone",
    "washing machines", "truck crane", "cds", "niche", "scoreboard", "briefcase", "boot", "sweater, jumper", "hay",
    "pack", "bottle rack", "glacier", "pergola", "building materials", "television camera", "first floor", "rifle",
    "tennis table", "stadium", "safety belt", "cover", "dish rack", "synthesizer", "pumpkin", "gutter", "fruit stand",
    "ice floe, floe", "handle, grip, handgrip, hold", "wheelchair", "mousepad, mouse mat", "diploma", "fairground ride",
    "radio", "hotplate", "junk", "wheelbarrow", "stream", "toll plaza", "punching bag", "trough", "throne",
    "chair desk", "weighbridge", "extractor fan", "hanging clothes", "dish, dish aerial, dish antenna, saucer",
    "alarm clock, alarm", "ski lift", "chain", "garage", "mechanical shovel", "wine rack", "tramway", "treadmill",
    "menu", "block", "well", "witness stand", "branch", "duck", "casserole", "frying pan", "desk organizer", "mast",
    "spectacles, specs, eyeglasses, glasses", "service elevator", "dollhouse", "hammock", "clothes hanging",
    "photocopier", "notepad", "golf cart", "footpath", "cross", "baptismal font", "boiler", "skip", "rotisserie",
    "tables", "water mill", "helmet", "cover curtain", "brick", "table runner", "ashtray", "street box", "stick",
    "hangers", "cells", "urinal", "centerpiece", "portable fridge", "dvds", "golf club", "skirting board",
    "water cooler", "clipboard", "camera, photographic camera", "pigeonhole", "chips", "food processor", "post box",
    "lid", "drum", "blender", "cave entrance", "dental chair", "obelisk", "canoe", "mobile", "monitors", "pool ball",
    "cue rack", "baggage carts", "shore", "fork", "paper filer", "bicycle rack", "coat rack", "garland", "sports bag",
    "fish tank", "towel dispenser", "carriage", "brochure", "plaque", "stringer", "iron", "spoon", "flag pole",
    "toilet brush", "book stand", "water faucet, water tap, tap, hydrant", "ticket office", "broom", "dvd",
    "ice bucket", "carapace, shell, cuticle, shield", "tureen", "folders", "chess", "root", "sewing machine", "model",
    "pen", "violin", "sweatshirt", "recycling materials", "mitten", "chopping board, cutting board", "mask", "log",
    "mouse, computer mouse", "grill", "hole", "target", "trash bag", "chalk", "sticks", "balloon", "score",
    "hair spray", "roll", "runner", "engine", "inflatable glove", "games", "pallets", "baskets", "coop", "dvd player",
    "rocking horse", "buckets", "bread rolls", "shawl", "watering can", "spotlights", "post-it", "bowls",
    "security camera", "runner cloth", "lock", "alarm, warning device, alarm system", "side", "roulette", "bone",
    "cutlery", "pool balls", "wheels", "spice rack", "plant pots", "towel ring", "bread box", "video", "funfair",
    "breads", "tripod", "ironing board", "skimmer", "hollow", "scratching post", "tricycle", "file box",
    "mountain pass", "tombstones", "cooker", "card game, cards", "golf bag", "towel paper", "chaise lounge", "sun",
    "toilet paper holder", "rake", "key", "umbrella stand", "dartboard", "transformer", "fireplace utensils",
    "sweatshirts", "cellular telephone, cellular phone, cellphone, cell, mobile phone", "tallboy", "stapler", "sauna",
    "test tube", "palette", "shopping carts", "tools", "push button, push, button", "star", "roof rack", "barbed wire",
    "spray", "ear", "sponge", "racket", "tins", "eyeglasses", "file", "scarfs", "sugar bowl", "flip flop", "headstones",
    "laptop bag", "leash", "climbing frame", "suit hanger", "floor spotlight", "plate rack", "sewer", "hard drive",
    "sprinkler", "tools box", "necklace", "bulbs", "steel industry", "club", "jack", "door bars",
    "control panel, instrument panel, control board, board, panel", "hairbrush", "napkin holder", "office",
    "smoke detector", "utensils", "apron", "scissors", "terminal", "grinder", "entry phone", "newspaper stand",
    "pepper shaker", "onions", "central processing unit, cpu, c p u , central processor, processor, mainframe", "tape",
    "bat", "coaster", "calculator", "potatoes", "luggage rack", "salt", "street number", "viewpoint", "sword", "cd",
    "rowing machine", "plug", "andiron, firedog, dog, dog-iron", "pepper", "tongs", "bonfire", "dog dish", "belt",
    "dumbbells", "videocassette recorder, vcr", "hook", "envelopes", "shower faucet", "watch", "padlock",
    "swimming pool ladder", "spanners", "gravy boat", "notice board", "trash bags", "fire alarm", "ladle",
    "stethoscope", "rocket", "funnel", "bowling pins", "valve", "thermometer", "cups", "spice jar", "night light",
    "soaps", "games table", "slotted spoon", "reel", "scourer", "sleeping robe", "desk mat", "dumbbell", "hammer",
    "tie", "typewriter", "shaker", "cheese dish", "sea star", "racquet", "butane gas cylinder", "paper weight",
    "shaving brush", "sunglasses", "gear shift", "towel rail", "adding machine, totalizer, totaliser"]

CONTEXT459_CLASSES = [
    "accordion", "aeroplane", "airconditioner", "antenna", "artillery", "ashtray", "atrium", "babycarriage", "bag",
    "ball", "balloon", "bambooweaving", "barrel", "baseballbat", "basket", "basketballbackboard", "bathtub", "bed",
    "bedclothes", "beer", "bell", "bench", "bicycle", "binoculars", "bird", "birdcage", "birdfeeder", "birdnest",
    "blackboard", "board", "boat", "bone", "book", "bottle", "bottleopener", "bowl", "box", "bracelet", "brick",
    "bridge", "broom", "brush", "bucket", "building", "bus", "cabinet", "cabinetdoor", "cage", "cake", "calculator",
    "calendar", "camel", "camera", "cameralens", "can", "candle", "candleholder", "cap", "car", "card", "cart", "case",
    "casetterecorder", "cashregister", "cat", "cd", "cdplayer", "ceiling", "cellphone", "cello", "chain", "chair",
    "chessboard", "chicken", "chopstick", "clip", "clippers", "clock", "closet", "cloth", "clothestree", "coffee",
    "coffeemachine", "comb", "computer", "concrete", "cone", "container", "controlbooth", "controller", "cooker",
    "copyingmachine", "coral", "cork", "corkscrew", "counter", "court", "cow", "crabstick", "crane", "crate", "cross",
    "crutch", "cup", "curtain", "cushion", "cuttingboard", "dais", "disc", "disccase", "dishwasher", "dock", "dog",
    "dolphin", "door", "drainer", "dray", "drinkdispenser", "drinkingmachine", "drop", "drug", "drum", "drumkit",
    "duck", "dumbbell", "earphone", "earrings", "egg", "electricfan", "electriciron", "electricpot", "electricsaw",
    "electronickeyboard", "engine", "envelope", "equipment", "escalator", "exhibitionbooth", "extinguisher", "eyeglass",
    "fan", "faucet", "faxmachine", "fence", "ferriswheel", "fireextinguisher", "firehydrant", "fireplace", "fish",
    "fishtank", "fishbowl", "fishingnet", "fishingpole", "flag", "flagstaff", "flame", "flashlight", "floor", "flower",
    "fly", "foam", "food", "footbridge", "forceps", "fork", "forklift", "fountain", "fox", "frame", "fridge", "frog",
    "fruit", "funnel", "furnace", "gamecontroller", "gamemachine", "gascylinder", "gashood", "gasstove", "giftbox",
    "glass", "glassmarble", "globe", "glove", "goal", "grandstand", "grass", "gravestone", "ground", "guardrail",
    "guitar", "gun", "hammer", "handcart", "handle", "handrail", "hanger", "harddiskdrive", "hat", "hay", "headphone",
    "heater", "helicopter", "helmet", "holder", "hook", "horse", "horse-drawncarriage", "hot-airballoon", "hydrovalve",
    "ice", "inflatorpump", "ipod", "iron", "ironingboard", "jar", "kart", "kettle", "key", "keyboard", "kitchenrange",
    "kite", "knife", "knifeblock", "ladder", "laddertruck", "ladle", "laptop", "leaves", "lid", "lifebuoy", "light",
    "lightbulb", "lighter", "line", "lion", "lobster", "lock", "machine", "mailbox", "mannequin", "map", "mask", "mat",
    "matchbook", "mattress", "menu", "metal", "meterbox", "microphone", "microwave", "mirror", "missile", "model",
    "money", "monkey", "mop", "motorbike", "mountain", "mouse", "mousepad", "musicalinstrument", "napkin", "net",
    "newspaper", "oar", "ornament", "outlet", "oven", "oxygenbottle", "pack", "pan", "paper", "paperbox", "papercutter",
    "parachute", "parasol", "parterre", "patio", "pelage", "pen", "pencontainer", "pencil", "person", "photo", "piano",
    "picture", "pig", "pillar", "pillow", "pipe", "pitcher", "plant", "plastic", "plate", "platform", "player",
    "playground", "pliers", "plume", "poker", "pokerchip", "pole", "pooltable", "postcard", "poster", "pot",
    "pottedplant", "printer", "projector", "pumpkin", "rabbit", "racket", "radiator", "radio", "rail", "rake", "ramp",
    "rangehood", "receiver", "recorder", "recreationalmachines", "remotecontrol", "road", "robot", "rock", "rocket",
    "rockinghorse", "rope", "rug", "ruler", "runway", "saddle", "sand", "saw", "scale", "scanner", "scissors", "scoop",
    "screen", "screwdriver", "sculpture", "scythe", "sewer", "sewingmachine", "shed", "sheep", "shell", "shelves",
    "shoe", "shoppingcart", "shovel", "sidecar", "sidewalk", "sign", "signallight", "sink", "skateboard", "ski", "sky",
    "sled", "slippers", "smoke", "snail", "snake", "snow", "snowmobiles", "sofa", "spanner", "spatula", "speaker",
    "speedbump", "spicecontainer", "spoon", "sprayer", "squirrel", "stage", "stair", "stapler", "stick", "stickynote",
    "stone", "stool", "stove", "straw", "stretcher", "sun", "sunglass", "sunshade", "surveillancecamera", "swan",
    "sweeper", "swimring", "swimmingpool", "swing", "switch", "table", "tableware", "tank", "tap", "tape", "tarp",
    "telephone", "telephonebooth", "tent", "tire", "toaster", "toilet", "tong", "tool", "toothbrush", "towel", "toy",
    "toycar", "track", "train", "trampoline", "trashbin", "tray", "tree", "tricycle", "tripod", "trophy", "truck",
    "tube", "turtle", "tvmonitor", "tweezers", "typewriter", "umbrella", "unknown", "vacuumcleaner", "vendingmachine",
    "videocamera", "videogameconsole", "videoplayer", "videotape", "violin", "wakeboard", "wall", "wallet", "wardrobe",
    "washingmachine", "watch", "water", "waterdispenser", "waterpipe", "waterskateboard", "watermelon", "whale",
    "wharf", "wheel", "wheelchair", "window", "windowblinds", "wineglass", "wire", "wood", "wool"]

VOC20B_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor", "bag", "bed", "bench", "book",
    "building", "cabinet", "ceiling", "cloth", "computer", "cup", "door", "fence", "floor", "flower", "food", "grass",
    "ground", "keyboard", "light", "mountain", "mouse", "curtain", "platform", "sign", "plate", "road", "rock",
    "shelves", "sidewalk", "sky", "snow", "bedclothes", "track", "tree", "truck", "wall", "water", "window", "wood"]


assert len(ADE150_CLASSES) == 150 and len(CONTEXT59_CLASSES) == 59 and len(VOC20_CLASSES) == 20
assert len(COCO_OBJECT_CLASSES) == 81 and len(COCO_STUFF27_CLASSES) == 27
assert len(ADE847_CLASSES) == 847 and len(CONTEXT459_CLASSES) == 459 and len(VOC20B_CLASSES) == 59
assert VOC20B_CLASSES[:20] == VOC20_CLASSES


def paper_prompt_name(name: str) -> str:
    """The words the paper's code prompts for a class name: ``name.split("-")[0]`` (seg4diff_model_ovss.py), so
    ``"food-stuff"`` is prompted as ``"food"``; surrounding whitespace dropped (the tokenizer drops it too). No list
    of Table 1 has a ``-``; COCO-Stuff-27's names (Table 2, unsupervised: never prompted) do."""
    return name.split("-")[0].strip()


def prompt_words(classes: Sequence[str]) -> List[str]:
    """The words each class is prompted with: :func:`paper_prompt_name`, except that a hyphenated name whose first part
    is another class's whole name is prompted whole (ADE-847's ``"post-it"`` beside ``"post"``, Pascal Context 459's
    ``"horse-drawncarriage"`` beside ``"horse"``): the paper's code prompts both ``"post"``, two classes no token
    tells apart. Names whose first parts collide otherwise (COCO-Stuff-27's ``"food-things"``, ``"food-stuff"``) keep
    the paper's words, and a supervised evaluation refuses them."""
    whole = {c.strip() for c in classes}
    words = []
    for c in classes:
        w = paper_prompt_name(c)
        words.append(c.strip() if w != c.strip() and w in whole else w)
    return words


@dataclass(frozen=True)
class Sample:
    id: str
    image: str
    label: str


class SegDataset:
    """A list of samples, the class names and the label mapping. ``load_label(s)`` -> ``[H, W]`` int64.

    ``unscored``: class ids that are prompted when present in an image's ground truth but whose pixels are not
    scored (COCO-Object's background in the paper's open-vocabulary protocol: ignore label 0).
    ``ignore_index``: the label value of unlabelled pixels (255; ADE-847's 65535 and Pascal Context 459's 459,
    whose class ids pass 255).
    ``prompt_classes``, ``prompt_class_ids``: the names prompted and the class each one scores as (default: the
    classes themselves). VOC20b prompts 59 names and scores 21 classes: its 39 background names score as
    ``background``. ``prompt_names``: the words each prompt class is prompted with (:func:`prompt_words`)."""

    def __init__(self, name: str, samples: List[Sample], classes: List[str], mapping: Callable[[np.ndarray], np.ndarray],
                 unscored: Sequence[int] = (), ignore_index: int = IGNORE_INDEX,
                 prompt_classes: Optional[Sequence[str]] = None, prompt_class_ids: Optional[Sequence[int]] = None):
        self.name, self.samples, self.classes, self._mapping = name, samples, list(classes), mapping
        self.unscored = tuple(int(c) for c in unscored)
        self.ignore_index = int(ignore_index)
        if 0 <= self.ignore_index < len(self.classes):
            raise ValueError(f"ignore_index {ignore_index} is a class id (0..{len(self.classes) - 1})")
        self.prompt_classes = list(self.classes if prompt_classes is None else prompt_classes)
        ids = range(len(self.classes)) if prompt_class_ids is None else prompt_class_ids
        self.prompt_class_ids = [int(c) for c in ids]
        if len(self.prompt_class_ids) != len(self.prompt_classes):
            raise ValueError(f"prompt_class_ids has {len(self.prompt_class_ids)} entries, prompt_classes "
                             f"{len(self.prompt_classes)}")
        if sorted(set(self.prompt_class_ids)) != list(range(len(self.classes))):
            raise ValueError(f"prompt_class_ids must name every class 0..{len(self.classes) - 1} and no other")

    @property
    def prompt_names(self) -> List[str]:
        return prompt_words(self.prompt_classes)

    def prompt_for(self, class_ids: Sequence[int], words: bool = True) -> Tuple[List[str], List[int]]:
        """The prompt words (:attr:`prompt_names`; ``words=False``: the :attr:`prompt_classes` names) of the classes
        ``class_ids`` and the class each one scores as, in prompt order (the order of :attr:`prompt_classes`)."""
        want = set(int(c) for c in class_ids)
        keep = [k for k, c in enumerate(self.prompt_class_ids) if c in want]
        names = self.prompt_names if words else self.prompt_classes
        return [names[k] for k in keep], [self.prompt_class_ids[k] for k in keep]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i) -> Sample:
        return self.samples[i]

    def load_label(self, sample: Sample) -> np.ndarray:
        # read as every image is (EXIF orientation applied, so that it keeps its image's size); palettes give indices
        raw = np.array(read_image(sample.label, "label"))
        if raw.ndim != 2:
            raise ValueError(f"label {sample.label} is not a single-channel (index or palette) image")
        return self._mapping(raw.astype(np.int64))


def _shift_down(raw: np.ndarray) -> np.ndarray:
    """0 -> 255 (ignored), k -> k - 1, 255 stays 255."""
    out = raw - 1
    out[(raw == 0) | (raw == 255)] = 255
    return out


def _identity(raw: np.ndarray) -> np.ndarray:
    return raw


def _background_last(raw: np.ndarray) -> np.ndarray:
    """Raw VOC -> voc21.json ids: 0 (background) -> 20, k -> k - 1, 255 stays 255."""
    out = raw - 1
    out[raw == 0] = 20
    out[raw == 255] = 255
    return out


def _coco_object_from_stuff(raw: np.ndarray) -> np.ndarray:
    """COCO-Stuff train ids (detectron2's prepared maps: 0..79 things, 80..170 stuff, 255 unlabeled) -> COCO-Object
    ids: things 1..80, stuff 0 (background), 255 stays 255."""
    out = np.full_like(raw, 255)
    out[raw < 80] = raw[raw < 80] + 1
    out[(raw >= 80) & (raw <= 170)] = 0
    return out


def _coco_root(root: str) -> str:
    return os.path.join(root, "coco") if os.path.isdir(os.path.join(root, "coco")) else root


def _stem_samples(img_dir: str, ann_dir: str, ext: str = ".png") -> List[Sample]:
    """One sample per label file ``ann_dir/<id><ext>``, its image ``img_dir/<id>.jpg``."""
    stems = sorted(f[: -len(ext)] for f in os.listdir(ann_dir) if f.endswith(ext))
    return [Sample(s, os.path.join(img_dir, s + ".jpg"), os.path.join(ann_dir, s + ext)) for s in stems]


def _coco_object(root: str, split: str, background: bool) -> SegDataset:
    root = _coco_root(root)
    sub = {"val": "val2017", "train": "train2017"}.get(split, split)
    prepared = os.path.join(root, "annotations_object", sub)
    stuff = os.path.join(root, "annotations_detectron2", sub)
    if os.path.isdir(prepared):
        ann, mapping = prepared, _identity
    elif os.path.isdir(stuff):
        ann, mapping = stuff, _coco_object_from_stuff
    else:
        raise FileNotFoundError(f"COCO-Object layout (coco/{sub} with coco/annotations_object/{sub}, or COCO-Stuff's "
                                f"coco/annotations_detectron2/{sub}): neither {prepared} nor {stuff} found")
    samples = _stem_samples(os.path.join(root, sub), ann)
    if background:
        return SegDataset("coco_object_bg", samples, COCO_OBJECT_CLASSES, mapping)
    return SegDataset("coco_object", samples, COCO_OBJECT_CLASSES, mapping, unscored=(0,))


def _coco_stuff27(root: str, split: str) -> SegDataset:
    root = _coco_root(root)
    sub = {"val": "val2017", "train": "train2017"}.get(split, split)
    ann = os.path.join(root, "annotations_27_detectron2", sub)
    _need(ann, f"COCO-Stuff-27 layout (coco/{sub}, coco/annotations_27_detectron2/{sub} with ids 0..26, 255 ignored)")
    return SegDataset("coco_stuff27", _stem_samples(os.path.join(root, sub), ann), COCO_STUFF27_CLASSES, _identity)


def _need(path: str, what: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path} not found")


def _voc(root: str, split: str, background: bool) -> SegDataset:
    if os.path.isdir(os.path.join(root, "VOC2012")):
        root = os.path.join(root, "VOC2012")
    lst = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    _need(lst, "Pascal VOC 2012 layout (JPEGImages, SegmentationClass, ImageSets/Segmentation)")
    ids = read_lines(lst, "VOC image list")
    # the paper's prepared labels (datasets/prepare_voc.py) when present: already in class ids, background 255
    # (voc20) or 20 (voc21); it skips images whose label is all 255, so those ids are skipped here too
    prepared = os.path.join(root, "annotations_detectron2_bg" if background else "annotations_detectron2", split)
    if os.path.isdir(prepared):
        samples = [Sample(i, os.path.join(root, "JPEGImages", i + ".jpg"), os.path.join(prepared, i + ".png"))
                   for i in ids if os.path.exists(os.path.join(prepared, i + ".png"))]
        mapping = _identity
    else:
        samples = [Sample(i, os.path.join(root, "JPEGImages", i + ".jpg"),
                          os.path.join(root, "SegmentationClass", i + ".png")) for i in ids]
        mapping = _background_last if background else _shift_down
    if background:
        return SegDataset("voc21", samples, VOC21_CLASSES, mapping)
    return SegDataset("voc20", samples, VOC20_CLASSES, mapping)


def _ade(root: str, split: str) -> SegDataset:
    if os.path.isdir(os.path.join(root, "ADEChallengeData2016")):
        root = os.path.join(root, "ADEChallengeData2016")
    sub = {"val": "validation", "train": "training"}.get(split, split)
    img_dir, ann_dir = os.path.join(root, "images", sub), os.path.join(root, "annotations", sub)
    _need(img_dir, "ADE20K layout (ADEChallengeData2016/images/..., annotations/...)")
    exts = images_by_stem(img_dir, (".jpg", ".jpeg", ".png"), "ADE20K images")
    stems = list(exts)
    prepared = os.path.join(root, "annotations_detectron2", sub)  # the paper's prepare_ade20k_150.py: 0..149, 255
    mapping = _shift_down
    if os.path.isdir(prepared):
        ann_dir, mapping = prepared, _identity
    samples = [Sample(s, os.path.join(img_dir, exts[s]), os.path.join(ann_dir, s + ".png")) for s in stems]
    return SegDataset("ade150", samples, ADE150_CLASSES, mapping)


def _context59(root: str, split: str) -> SegDataset:
    if os.path.isdir(os.path.join(root, "VOC2010")):
        root = os.path.join(root, "VOC2010")
    ann = os.path.join(root, "annotations_detectron2", f"pc59_{split}")
    _need(ann, "Pascal Context 59 prepared by detectron2 (JPEGImages, annotations_detectron2/pc59_val)")
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(ann) if f.endswith(".png"))
    samples = [Sample(s, os.path.join(root, "JPEGImages", s + ".jpg"), os.path.join(ann, s + ".png")) for s in stems]
    return SegDataset("context59", samples, CONTEXT59_CLASSES, _identity)


def _context59_bg(root: str, split: str) -> SegDataset:
    if os.path.isdir(os.path.join(root, "VOC2010")):
        root = os.path.join(root, "VOC2010")
    ann = os.path.join(root, "annotations_detectron2_bg", f"pc59_{split}")
    _need(ann, "Pascal Context 59 with background (JPEGImages, annotations_detectron2_bg/pc59_val: 0 background, "
               "1..59 classes)")
    return SegDataset("context59_bg", _stem_samples(os.path.join(root, "JPEGImages"), ann),
                      ["background"] + CONTEXT59_CLASSES, _identity)


def _voc20b(root: str, split: str) -> SegDataset:
    """voc21's files and classes (background scored as class 20), prompted with voc20b.json: the 20 VOC names, then
    39 Pascal Context names that each score as background (CAT-Seg's VOC-b protocol; the paper's
    ``VOCbEvaluator`` folds every prediction >= 20 into background)."""
    voc = _voc(root, split, True)
    return SegDataset("voc20b", voc.samples, VOC21_CLASSES, voc._mapping, prompt_classes=VOC20B_CLASSES,
                      prompt_class_ids=list(range(20)) + [20] * (len(VOC20B_CLASSES) - 20))


def _ade847(root: str, split: str) -> SegDataset:
    """prepare_ade20k_full.py's output: ``ADE20K_2021_17_01/images_detectron2/<split>/*.jpg`` and
    ``annotations_detectron2/<split>/*.tif`` (16-bit, ids 0..846, 65535 unlabelled)."""
    if os.path.isdir(os.path.join(root, "ADE20K_2021_17_01")):
        root = os.path.join(root, "ADE20K_2021_17_01")
    sub = {"val": "validation", "train": "training"}.get(split, split)
    ann = os.path.join(root, "annotations_detectron2", sub)
    _need(ann, "ADE20K-847 prepared by the paper's datasets/prepare_ade20k_full.py (ADE20K_2021_17_01/"
               f"images_detectron2/{sub}, annotations_detectron2/{sub} with 16-bit .tif labels)")
    return SegDataset("ade847", _stem_samples(os.path.join(root, "images_detectron2", sub), ann, ".tif"),
                      ADE847_CLASSES, _identity, ignore_index=65535)


def _context459(root: str, split: str) -> SegDataset:
    """prepare_pascal_context_459.py's output: ``VOC2010/JPEGImages`` and ``annotations_detectron2/pc459_<split>/*.tif``
    (16-bit, ``LabelMap - 1``: ids 0..458; 459 unlabelled, as the paper's registration says)."""
    if os.path.isdir(os.path.join(root, "VOC2010")):
        root = os.path.join(root, "VOC2010")
    ann = os.path.join(root, "annotations_detectron2", f"pc459_{split}")
    _need(ann, "Pascal Context 459 prepared by the paper's datasets/prepare_pascal_context_459.py (JPEGImages, "
               f"annotations_detectron2/pc459_{split} with 16-bit .tif labels)")
    return SegDataset("context459", _stem_samples(os.path.join(root, "JPEGImages"), ann, ".tif"), CONTEXT459_CLASSES,
                      _identity, ignore_index=459)


def _cityscapes(root: str, split: str) -> SegDataset:
    img_root = os.path.join(root, "leftImg8bit", split)
    _need(img_root, "Cityscapes layout (leftImg8bit/val/<city>, gtFine/val/<city> with *_labelTrainIds.png)")
    samples = []
    for city in sorted(os.listdir(img_root)):
        for f in sorted(os.listdir(os.path.join(img_root, city))):
            if f.endswith("_leftImg8bit.png"):
                stem = f[: -len("_leftImg8bit.png")]
                samples.append(Sample(stem, os.path.join(img_root, city, f),
                                      os.path.join(root, "gtFine", split, city, stem + "_gtFine_labelTrainIds.png")))
    return SegDataset("cityscapes", samples, CITYSCAPES_CLASSES, _identity)


def _folder(root: str, split: str) -> SegDataset:
    names = os.path.join(root, "classes.txt")
    _need(names, "generic layout (images/, labels/, classes.txt)")
    classes = read_lines(names, "classes.txt", ids=True)  # as users save it: a byte-order mark, CRLF
    if len(classes) > IGNORE_INDEX:
        raise ValueError(f"classes.txt names {len(classes)} classes; the folder layout's labels hold ids "
                         f"0..{IGNORE_INDEX - 1} ({IGNORE_INDEX} = ignored)")
    img_dir, lab_dir = os.path.join(root, "images"), os.path.join(root, "labels")
    _need(img_dir, "generic layout (images/, labels/, classes.txt)")
    files = images_by_stem(img_dir, IMAGE_SUFFIXES, "folder dataset images")
    unlabelled = [files[s] for s in sorted(files) if not os.path.isfile(os.path.join(lab_dir, s + ".png"))]
    if unlabelled:  # never evaluated on fewer images than the folder holds, silently
        raise ValueError(f"folder dataset: {len(unlabelled)} image(s) of {img_dir!r} have no label "
                         f"labels/<name>.png: {', '.join(unlabelled[:3])}{', ...' if len(unlabelled) > 3 else ''}; "
                         "add their labels or move them out of images/")
    samples = [Sample(s, os.path.join(img_dir, files[s]), os.path.join(lab_dir, s + ".png")) for s in sorted(files)]
    return SegDataset(os.path.basename(os.path.normpath(root)), samples, classes, _identity)


DATASETS = {
    "voc20": lambda r, s: _voc(r, s, False),
    "voc21": lambda r, s: _voc(r, s, True),
    "voc20b": _voc20b,
    "ade150": _ade,
    "ade847": _ade847,
    "context59": _context59,
    "context59_bg": _context59_bg,
    "context459": _context459,
    "coco_object": lambda r, s: _coco_object(r, s, False),
    "coco_object_bg": lambda r, s: _coco_object(r, s, True),
    "coco_stuff27": _coco_stuff27,
    "cityscapes": _cityscapes,
    "folder": _folder,
}


def open_dataset(name: str, root: str, split: str = "val", limit: Optional[int] = None) -> SegDataset:
    """``name`` in :data:`DATASETS`; ``limit`` keeps the first samples (sorted, deterministic)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, not {name!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root {root!r} is not a folder")
    ds = DATASETS[name](root, split)
    ds.split = split  # part of an evaluation's settings (evaluate.run_settings), as the root folder is
    ds.root = os.path.realpath(root)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an integer >= 1 (or None for every sample), got {limit!r}")
        ds.samples = ds.samples[:limit]
    return ds
